"""Start and stop the local stack: kube-apiserver + etcd, NATS JetStream, Redis, Postgres.

Every service binds 127.0.0.1 on a free port, keeps its data in one temporary directory and
is stopped by PID. The same code backs `mljob dev stack`, the pytest session fixture and
`make demo`, so tests, demo and development all run against identical components.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mljob_dev.devstack import certs as certgen
from mljob_dev.devstack import nats_config, tools

STATE_FILE = "stack.json"


class StackError(RuntimeError):
    """The stack could not start; the message names the component and what to do."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """A running (or stopped) local stack, persisted as JSON in its directory."""

    directory: Path
    pids: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def save(self) -> None:
        """Owner-only: the env holds the NATS passwords."""
        self.state_path.touch(mode=0o600)
        self.state_path.chmod(0o600)
        self.state_path.write_text(
            json.dumps({"directory": str(self.directory), "pids": self.pids, "env": self.env}, indent=2)
        )

    @classmethod
    def load(cls, directory: Path) -> Stack:
        data = json.loads((directory / STATE_FILE).read_text())
        return cls(directory=Path(data["directory"]), pids=data["pids"], env=data["env"])

    def export_lines(self) -> str:
        return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in sorted(self.env.items()))

    # ------------------------------------------------------------------ processes
    def spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            user=user,
            cwd=self.directory,
        )
        self.pids[name] = proc.pid
        self.save()

    def wait_ready(self, name: str, ready: Callable[[], bool], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pids[name]
            if not _alive(pid):
                raise StackError(f"{name} exited during start-up; see its log:\n{self.log_tail(name)}")
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise StackError(f"{name} was not ready after {timeout:.0f}s; see its log:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.directory / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.state_path.exists():  # `restart` (maybe another process) replaces PIDs there
            self.pids.update(Stack.load(self.directory).pids)
        for name in reversed(list(self.pids)):
            if name == "containerd":  # its containers' shims outlive it
                from mljob_dev.devstack import node

                node.stop_containers(self.directory)
            _terminate(self.pids[name])
        self.pids.clear()

    # ------------------------------------------------------------------ services
    def start_etcd(self) -> str:
        binary = _etcd_binary()
        client, peer = free_port(), free_port()
        data = self.directory / "etcd"
        cmd = [
            str(binary),
            "--name",
            "default",
            "--data-dir",
            str(data),
            "--listen-client-urls",
            f"http://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{peer}",
            "--log-level",
            "warn",
        ]
        if binary.name.startswith("etcd-v3.5"):
            cmd.append("--unsafe-no-fsync")
        self.spawn("etcd", cmd)
        url = f"http://127.0.0.1:{client}"
        self.wait_ready("etcd", lambda: b"true" in _http_get(f"{url}/health"))
        return url

    def start_kube_apiserver(self, etcd_url: str, node: bool = False) -> None:
        """With `node`, pods run: the ServiceAccount admission mounts their tokens (the node's
        kube-controller-manager creates each namespace's `default` account, which it needs)."""
        binary = tools.ensure("kube-apiserver")
        pki = certgen.generate(self.directory / "pki")
        port = free_port()
        cmd = [
            str(binary),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.directory / 'pki'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            # As a cluster runs: kubelets are authorized by the Node authorizer and restricted to
            # their own Node and pods by NodeRestriction.
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={pki.admin_cert}",
            f"--kubelet-client-key={pki.admin_key}",
            f"--kubelet-certificate-authority={pki.ca_cert}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki.sa_public_key}",
            f"--service-account-signing-key-file={pki.sa_private_key}",
            "--api-audiences=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.0.0.0/24",
            *(() if node else ("--disable-admission-plugins=ServiceAccount",)),
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]
        self.spawn("kube-apiserver", cmd)
        server = f"https://127.0.0.1:{port}"
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        self.wait_ready("kube-apiserver", lambda: _http_get(f"{server}/readyz", context) == b"ok", 180)
        kubeconfig = self.directory / "kubeconfig"
        kubeconfig.write_text(_kubeconfig(server, pki))
        kubeconfig.chmod(0o600)
        self.env["KUBECONFIG"] = str(kubeconfig)
        self.env["MLJOB_KUBE_SERVER"] = server

    def start_nats(self, port: int | None = None, monitor: int | None = None) -> None:
        """TLS, three identities (nats_config); JetStream keeps its file store in the stack
        directory and the config keeps its passwords and certificates, so a restart keeps both."""
        binary = tools.ensure("nats-server")
        port, monitor = port or free_port(), monitor or free_port()
        config = nats_config.write(self.directory / "nats", port, monitor, self.directory / "jetstream")
        self.spawn("nats-server", config.command(binary))
        self.wait_ready(
            "nats-server",
            lambda: b"ok" in _http_get(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"),
        )
        self.env.update(config.env())
        self.env["MLJOB_NATS_MONITOR_URL"] = f"http://127.0.0.1:{monitor}"

    def start_redis(self, port: int | None = None) -> None:
        """No persistence (as configured in many deployments): a restart starts Redis empty."""
        binary = _require("redis-server", "apt-get install redis-server")
        port = port or free_port()
        cmd = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--protected-mode",
            "no",
        ]
        self.spawn("redis-server", cmd)
        self.wait_ready("redis-server", lambda: _redis_ping(port))
        self.env["MLJOB_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"

    def _initdb(self, bindir: Path, data: Path, user: str | None) -> None:
        init = subprocess.run(
            [
                *(str(bindir / "initdb"), "-D", str(data), "-U", "postgres"),
                *("--auth=trust", "-E", "UTF8", "--no-sync"),
            ],
            capture_output=True,
            text=True,
            user=user,
            cwd=self.directory,
        )
        if init.returncode != 0:
            raise StackError(f"initdb failed:\n{init.stdout}\n{init.stderr}")

    def start_postgres(self, port: int | None = None) -> None:
        """A new cluster; with `port` (a restart) the existing data directory is started again."""
        bindir = _postgres_bindir()
        data = self.directory / "postgres"
        restart = port is not None
        data.mkdir(exist_ok=restart)
        user = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            user = "postgres"
            shutil.chown(data, user=user)
            blocked = [p for p in data.parents if p.exists() and not p.stat().st_mode & 0o001]
            if blocked:
                raise StackError(
                    f"the postgres user cannot reach {data}: {blocked[0]} is not traversable by other "
                    "users (chmod o+x it, or choose a stack directory elsewhere)"
                )
        if not restart:
            self._initdb(bindir, data, user)
        port = port or free_port()
        cmd = [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(data),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
        ]
        self.spawn("postgres", cmd, user=user)
        admin_dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self.wait_ready("postgres", lambda: _postgres_ready(admin_dsn))
        if not restart:
            _postgres_execute(admin_dsn, "CREATE DATABASE mljob")
        self.env["MLJOB_POSTGRES_DSN"] = f"postgresql://postgres@127.0.0.1:{port}/mljob"


def up(directory: Path | None = None, node: bool = False, ha: bool = False) -> Stack:
    """Start every service and return the running stack (stopped again on failure).

    With `node`, a node too (devstack/node.py): containerd, a kubelet, a controller manager
    and a scheduler, so that pods run. With `ha`, the clustered servers instead of one of each
    (issue 15): three NATS nodes (nats_cluster), a Redis Cluster of three primaries and three
    replicas (redis_cluster), a Postgres primary with a streaming standby and automatic failover
    on the stack's etcd (postgres_ha); `MLJOB_STACK_HA=1` marks such a stack's environment."""
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="mljob-stack-"))
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # the postgres user must reach its data directory
    stack = Stack(directory=directory)
    stack.env["MLJOB_STACK_DIR"] = str(directory)
    try:
        # Build or locate everything first, so a missing tool fails before anything starts.
        tools.ensure("kube-apiserver")
        tools.ensure("nats-server")
        _etcd_binary()
        _require("redis-server", "apt-get install redis-server")
        _postgres_bindir()
        if node:
            from mljob_dev.devstack import node as devnode

            devnode.check_host()
            tools.ensure_node()
        etcd_url = stack.start_etcd()
        if ha:
            _start_clustered(stack, etcd_url)
        else:
            stack.start_nats()
            stack.start_redis()
            stack.start_postgres()
        stack.start_kube_apiserver(etcd_url, node=node)
        if node:
            devnode.start(stack)
    except BaseException:
        stack.stop()
        raise
    stack.save()
    return stack


def _start_clustered(stack: Stack, etcd_url: str) -> None:
    """The clustered servers of `up(ha=True)`, each module setting the variables its clients
    read; streams and the registry are made with three replicas."""
    from mljob_dev.devstack import nats_cluster, postgres_ha, redis_cluster

    nats_cluster.start(stack)
    redis_cluster.start(stack)
    stack.env["MLJOB_REDIS_URL"] = stack.env["MLJOB_REDIS_CLUSTER_URL"]
    stack.env["MLJOB_REDIS_CLUSTER"] = "true"
    postgres_ha.start(stack, etcd_url)
    stack.env["MLJOB_STREAM_REPLICAS"] = "3"
    stack.env["MLJOB_STACK_HA"] = "1"


def down(directory: Path, remove: bool = True) -> None:
    stack = Stack.load(directory)
    stack.stop()
    if remove:
        if (directory / "node").exists():
            from mljob_dev.devstack import node as devnode

            devnode.unmount_under(directory)
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------- helpers
def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _terminate(pid: int, grace: float = 10.0, first: signal.Signals = signal.SIGTERM) -> bool:
    """Stop a process group: `first`, then SIGKILL after `grace`. True once it is gone."""
    for sig, wait in ((first, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.1)
    return False


def _http_get(url: str, context: ssl.SSLContext | None = None) -> bytes:
    with urllib.request.urlopen(url, timeout=2, context=context) as resp:
        return bytes(resp.read())


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


def _postgres_ready(dsn: str) -> bool:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=2) as conn:
        conn.execute("SELECT 1")
    return True


def _postgres_execute(dsn: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.encode())


def _require(binary: str, hint: str) -> str:
    path = shutil.which(binary)
    if not path:
        raise StackError(f"{binary} not found: {hint}")
    return path


def _postgres_bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if candidates:
        return candidates[0].parent
    raise StackError("PostgreSQL server not found: apt-get install postgresql")


def _etcd_binary() -> Path:
    """etcd 3.5 built from the Go module proxy; Debian's etcd-server if that build fails."""
    try:
        return tools.ensure("etcd")
    except tools.ToolError as err:
        system = shutil.which("etcd")
        if system:
            print(f"warning: building etcd failed, using {system}: {err}", file=sys.stderr)
            return Path(system)
        raise StackError(f"etcd unavailable ({err}); install Go or apt-get install etcd-server") from err


def _kubeconfig(server: str, pki: certgen.ClusterCerts) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "mljob-local",
                    "cluster": {"server": server, "certificate-authority": str(pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": "mljob-admin",
                    "user": {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)},
                }
            ],
            "contexts": [
                {
                    "name": "mljob-local",
                    "context": {"cluster": "mljob-local", "user": "mljob-admin", "namespace": "default"},
                }
            ],
            "current-context": "mljob-local",
        },
        indent=2,
    )
