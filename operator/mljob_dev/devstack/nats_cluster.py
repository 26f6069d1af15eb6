"""A NATS JetStream cluster for the local stack: three nats-server nodes on loopback (issue 15).

Why three: the smallest cluster whose JetStream meta group and R3 streams keep a quorum when one
node is lost. Each node (`server_name` n1..n3) has its own client, monitor and route port and its
own JetStream store dir (`<stack>/jetstream-n<i>`), and runs nats_config's config: the same TLS
serving certificate (it covers 127.0.0.1, every node's address), the same users, passwords and
per-role permissions as the single server, plus a `cluster` block with routes to the other two.
Clients get all three client URLs, comma-separated, in MLJOB_NATS_URL (natsconn makes that the
server list), so a client whose node goes away reconnects to another.

Timings: a leader change is driven by JetStream's RAFT election timeout (4-9 s, fixed in the
server). A SIGKILLed or stopped node's routes close at once on loopback, so its streams'
followers elect a new leader within the election timeout, a few seconds. Route pings keep the
server's defaults: shorter ones drop the routes of a node that is only busy (nats_config).

Leaders are read from the nodes' monitor (`/jsz`), which needs no credentials: a node's own
report of the groups it leads (a leader knows it leads; a follower's view may lag).
"""

from __future__ import annotations

import json
import signal
import time
import urllib.parse
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from mljob_dev.devstack import nats_config, tools
from mljob_dev.devstack.restart import stop_one
from mljob_dev.devstack.stack import Stack, StackError, _alive, _http_get, free_port

SIZE = 3
CLUSTER_NAME = "mljob-local"
STATE_FILE = "nats-cluster.json"


@dataclass(frozen=True)
class NatsNode:
    index: int  # 1..SIZE
    port: int  # clients (TLS)
    monitor: int  # HTTP monitor
    route: int  # cluster routes

    @property
    def name(self) -> str:
        """The stack's process name."""
        return f"nats-{self.index}"

    @property
    def server_name(self) -> str:
        return f"n{self.index}"

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor}"


Node = NatsNode | int


def nodes(stack: Stack) -> list[NatsNode]:
    """The cluster's nodes, as `start` saved them in the stack directory."""
    path = stack.directory / STATE_FILE
    if not path.exists():
        raise StackError(f"the stack in {stack.directory} has no NATS cluster")
    return [NatsNode(**entry) for entry in json.loads(path.read_text())]


def node(stack: Stack, which: Node) -> NatsNode:
    """A node by itself or by its index (1..3)."""
    index = which.index if isinstance(which, NatsNode) else which
    for found in nodes(stack):
        if found.index == index:
            return found
    raise StackError(f"the NATS cluster has no node {index}")


def node_of_server(stack: Stack, server_name: str) -> NatsNode:
    """The node of a `server_name` (n1..n3), as a stream's or the meta group's leader is named."""
    for found in nodes(stack):
        if found.server_name == server_name:
            return found
    raise StackError(f"the NATS cluster has no server {server_name!r}")


def start(stack: Stack, size: int = SIZE) -> list[NatsNode]:
    """Start `size` nodes on free ports, wait until each has JetStream on and the cluster has a
    meta leader that sees every node; sets MLJOB_NATS_URL (all client URLs, comma-separated),
    the CA and the roles' identities (nats_config), MLJOB_NATS_MONITOR_URL (node 1's monitor)
    and MLJOB_NATS_MONITOR_URLS (every node's, comma-separated)."""
    tools.ensure("nats-server")
    started = [NatsNode(i + 1, free_port(), free_port(), free_port()) for i in range(size)]
    (stack.directory / STATE_FILE).write_text(json.dumps([asdict(n) for n in started], indent=2))
    config = None
    for each in started:
        config = _spawn(stack, each, started)
    for each in started:
        stack.wait_ready(each.name, partial(_js_enabled, each))
    assert config is not None
    wait_formed(stack, started)
    stack.env.update(config.env())
    stack.env["MLJOB_NATS_URL"] = ",".join(n.url for n in started)
    stack.env["MLJOB_NATS_MONITOR_URL"] = started[0].monitor_url
    stack.env["MLJOB_NATS_MONITOR_URLS"] = ",".join(n.monitor_url for n in started)
    stack.save()
    return started


def _spawn(stack: Stack, each: NatsNode, every: list[NatsNode]) -> nats_config.NatsConfig:
    cluster = nats_config.Cluster(
        name=CLUSTER_NAME,
        server_name=each.server_name,
        port=each.route,
        routes=tuple(n.route for n in every if n.index != each.index),
    )
    store = stack.directory / f"jetstream-{each.server_name}"
    config = nats_config.write(stack.directory / "nats", each.port, each.monitor, store, cluster=cluster)
    stack.spawn(each.name, config.command(tools.ensure("nats-server")))
    return config


def kill(stack: Stack, which: Node) -> None:
    """SIGKILL one node (a crash: no clean hand-over of its leaderships)."""
    stop_one(stack, node(stack, which).name, grace=0.0, first=signal.SIGKILL)


def stop(stack: Stack, which: Node) -> None:
    """Stop one node cleanly (SIGTERM)."""
    stop_one(stack, node(stack, which).name, first=signal.SIGTERM)


def start_node(stack: Stack, which: Node, timeout: float = 60.0) -> NatsNode:
    """Start a stopped (or killed) node again on its ports with its store; waits until it is
    healthy (`/healthz`: JetStream current with the meta group and its streams caught up)."""
    found = node(stack, which)
    pid = stack.pids.get(found.name)
    if pid is not None and _alive(pid):
        raise StackError(f"{found.name} is still running (pid {pid})")
    _spawn(stack, found, nodes(stack))
    stack.wait_ready(found.name, partial(healthy, found), timeout)
    stack.save()
    return found


# ---------------------------------------------------------------------- monitor
def _json(each: NatsNode, path: str, **query: str) -> dict[str, Any]:
    url = f"{each.monitor_url}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data: dict[str, Any] = json.loads(_http_get(url))
    return data


def _js_enabled(each: NatsNode) -> bool:
    return b"ok" in _http_get(f"{each.monitor_url}/healthz?js-enabled-only=true")


def healthy(each: NatsNode) -> bool:
    """The node's full health check: JetStream on, current with the meta leader, every stream
    and consumer it holds caught up."""
    try:
        return _json(each, "/healthz").get("status") == "ok"
    except Exception:  # a 503 (not yet current) or a node that does not answer
        return False


def jsz(each: NatsNode, **query: str) -> dict[str, Any] | None:
    """The node's `/jsz` (e.g. `streams="true"`, `consumers="true"`), None when it does not answer."""
    try:
        return _json(each, "/jsz", **query)
    except Exception:
        return None


def meta_leader(stack: Stack) -> str:
    """The server name of the JetStream meta leader, as the leader reports itself; raises
    StackError while there is none."""
    for each in nodes(stack):
        report = jsz(each)
        meta = (report or {}).get("meta_cluster") or {}
        if meta.get("leader") == each.server_name:
            return each.server_name
    raise StackError("the NATS cluster has no meta leader")


def wait_formed(stack: Stack, among: list[NatsNode] | None = None, timeout: float = 60.0) -> str:
    """Wait until a meta leader sees every node of the cluster as a current peer; its name."""
    every = among or nodes(stack)
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        for each in every:
            meta = ((jsz(each) or {}).get("meta_cluster")) or {}
            last = meta or last
            peers = meta.get("replicas") or []
            if (
                meta.get("leader") == each.server_name
                and meta.get("cluster_size") == len(every)
                and len(peers) == len(every) - 1
                and all(p.get("current") and not p.get("offline") for p in peers)
            ):
                return each.server_name
        time.sleep(0.2)
    raise StackError(f"the NATS cluster did not form within {timeout:.0f}s (last meta view: {last})")


def _groups(stack: Stack, query: dict[str, str]) -> list[tuple[NatsNode, dict[str, Any]]]:
    """(node, stream detail) of every stream each answering node holds."""
    out = []
    for each in nodes(stack):
        report = jsz(each, accounts="true", **query) or {}
        for account in report.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                out.append((each, stream))
    return out


def stream_leaders(stack: Stack) -> dict[str, str | None]:
    """Every stream an answering node holds -> the server name of its leader, as the leader
    reports itself (None while there is none)."""
    leaders: dict[str, str | None] = {}
    for each, detail in _groups(stack, {"streams": "true"}):
        name = str(detail.get("name"))
        leads = (detail.get("cluster") or {}).get("leader") == each.server_name
        if leads or name not in leaders:
            leaders[name] = each.server_name if leads else None
    return leaders


def stream_leader(stack: Stack, stream: str) -> str | None:
    """The server name of `stream`'s leader, as the leader reports itself (None while there is none)."""
    return stream_leaders(stack).get(stream)
