"""The local NATS server's config file: TLS, JetStream and a least-privilege identity per role.

Why a config file and not flags: accounts, users and per-user permissions exist only there. The
stack runs NATS the way a production one should be run (authentication, `tls://`, workers unable
to touch anything but their tasks and results), so the tests and the demo prove that the code
works under those permissions. Everything lives in `<stack>/nats/`, private (0600) files; the
passwords and the certificates are written once and reused, so `mljob dev stack restart nats`
(which writes the config again) keeps every client's credentials valid. With `cluster` (a node of
nats_cluster's three), the same users, certificate and passwords plus a `cluster` block.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from mljob.ops import permissions as nats_permissions
from mljob_dev.devstack import certs as certgen

SERVER_NAME = "mljob-local"
ACCOUNT = "MLJOB"
OPERATOR_USER = "mljob-operator"
COLLECTOR_USER = "mljob-collector"
WORKER_USER = "mljob-worker"
API_USER = "mljob-api"
#: Everything, for tests and hand inspection only (setting up private streams, reading results):
#: never the identity of a process under test.
ADMIN_USER = "mljob-dev-admin"
ADMIN = nats_permissions.Permissions(publish_allow=(">",), publish_deny=(), subscribe_allow=(">",))

#: The routes' one identity (a cluster block has a single user); not a client's.
ROUTE_USER = "mljob-route"

#: The stack's identities: user name -> permissions (the worker serves every pipeline).
STACK_USERS: Mapping[str, nats_permissions.Permissions] = {
    OPERATOR_USER: nats_permissions.operator(),
    COLLECTOR_USER: nats_permissions.collector(),
    WORKER_USER: nats_permissions.worker(),
    API_USER: nats_permissions.api(),
    ADMIN_USER: ADMIN,
}


@dataclass(frozen=True)
class Cluster:
    """One node's place in a cluster: the cluster's name, the node's `server_name` (unique in
    the cluster), its route port and the other nodes' route ports; `password` is the routes'
    (`write` fills it in from the saved passwords)."""

    name: str
    server_name: str
    port: int
    routes: tuple[int, ...]
    password: str = ""


@dataclass(frozen=True)
class NatsConfig:
    """A written config: where it is, what clients trust, and each user's password."""

    path: Path
    port: int
    ca_cert: Path
    passwords: Mapping[str, str]

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"

    def command(self, binary: Path) -> list[str]:
        return [str(binary), "-c", str(self.path)]

    def env(self) -> dict[str, str]:
        """The stack's exports: the operator is the default identity (operator and dev tools);
        the other roles' are there for running those with their own rights (see `role_env`)."""
        exports = {
            "MLJOB_NATS_URL": self.url,
            "MLJOB_NATS_TLS_CA_FILE": str(self.ca_cert),
            "MLJOB_NATS_USER": OPERATOR_USER,
            "MLJOB_NATS_PASSWORD": self.passwords[OPERATOR_USER],
        }
        for user, prefix in ROLE_VARIABLES.values():
            if user in self.passwords:
                exports[f"{prefix}_USER"] = user
                exports[f"{prefix}_PASSWORD"] = self.passwords[user]
        return exports


#: Each other role's identity, by role: its user, and the prefix of the variables the stack
#: exports it in (`<prefix>_USER`, `<prefix>_PASSWORD`); the operator's is MLJOB_NATS_USER itself.
ROLE_VARIABLES = {
    "collector": (COLLECTOR_USER, "MLJOB_DEV_NATS_COLLECTOR"),
    "worker": (WORKER_USER, "MLJOB_DEV_NATS_WORKER"),
    "api": (API_USER, "MLJOB_DEV_NATS_API"),
    "admin": (ADMIN_USER, "MLJOB_DEV_NATS_ADMIN"),
}
#: The NATS settings a stack exports for its default (operator) identity.
NATS_VARIABLES = ("MLJOB_NATS_URL", "MLJOB_NATS_USER", "MLJOB_NATS_PASSWORD", "MLJOB_NATS_TLS_CA_FILE")


def role_env(env: Mapping[str, str], role: str = "operator") -> dict[str, str]:
    """The MLJOB_NATS_* variables a process of `role` runs with, from a stack's exports `env`:
    the operator's as exported, another role's user and password in their place. A stack
    without that identity (or without authentication) leaves the default one."""
    out = {k: env[k] for k in NATS_VARIABLES if env.get(k)}
    if role != "operator":
        prefix = ROLE_VARIABLES[role][1]
        if env.get(f"{prefix}_USER"):
            out["MLJOB_NATS_USER"] = env[f"{prefix}_USER"]
            out["MLJOB_NATS_PASSWORD"] = env.get(f"{prefix}_PASSWORD", "")
    return out


def _private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read, never readable in between."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(0o600)


def _passwords(path: Path, users: list[str]) -> dict[str, str]:
    """The saved passwords, plus a new random one for each user without one."""
    saved: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [user for user in users if user not in saved]
    for user in missing:
        saved[user] = secrets.token_urlsafe(24)
    if missing or not path.exists():
        _private(path, json.dumps(saved, indent=2))
    return saved


def _serving_certs(directory: Path) -> certgen.ServingCerts:
    certs = certgen.ServingCerts(
        ca_cert=directory / "ca.crt", cert=directory / "server.crt", key=directory / "server.key"
    )
    if all(p.exists() for p in (certs.ca_cert, certs.cert, certs.key)):
        return certs
    return certgen.generate_serving(directory, "nats")


def render(
    port: int,
    monitor: int,
    store_dir: Path,
    tls: certgen.ServingCerts,
    users: Mapping[str, tuple[str, nats_permissions.Permissions]],
    cluster: Cluster | None = None,
) -> str:
    """nats-server config: loopback only, JetStream, TLS required, one account of `users`
    (user -> (password, permissions)); no user means no connection (no `no_auth_user`).
    With `cluster`, that node's name and routes (see `_cluster_block`)."""
    q = nats_permissions.quote
    entries = ",\n".join(
        nats_permissions.render_user(user, permissions, password)
        for user, (password, permissions) in users.items()
    )
    indented = "\n".join(f"      {line}" for line in entries.splitlines())
    return (
        "# Written by `mljob dev stack` on every start of nats-server; do not edit.\n"
        f"server_name: {q(cluster.server_name if cluster else SERVER_NAME)}\n"
        f"listen: {q(f'127.0.0.1:{port}')}\n"
        f"http: {q(f'127.0.0.1:{monitor}')}\n"
        f"jetstream {{\n  store_dir: {q(str(store_dir))}\n}}\n"
        # A TLS handshake on a busy 2-core test machine can take longer than the 2 s default.
        f"tls {{\n  cert_file: {q(str(tls.cert))}\n  key_file: {q(str(tls.key))}\n  timeout: 10\n}}\n"
        f"accounts {{\n  {ACCOUNT} {{\n    jetstream: enabled\n    users: [\n{indented}\n    ]\n  }}\n}}\n"
        + (_cluster_block(cluster) if cluster else "")
    )


def _cluster_block(cluster: Cluster) -> str:
    """Routes in plain TCP on loopback, authenticated by ROUTE_USER: nats-server requires mutual
    TLS on routes (it verifies a client certificate) and the stack's certificate serves only.

    Route pings keep the server's defaults (minutes). Pings of a second, two missed, dropped
    the routes of a node busy writing a metalayer snapshot of 4,000 consumers (3-4 s): the
    cluster lost its meta leader and never got it back (bench/mljob_many --ha at 10,000)."""
    q = nats_permissions.quote
    routes = ",\n".join(
        f"    {q(f'nats-route://{ROUTE_USER}:{cluster.password}@127.0.0.1:{port}')}"
        for port in cluster.routes
    )
    return (
        f"cluster {{\n  name: {q(cluster.name)}\n  listen: {q(f'127.0.0.1:{cluster.port}')}\n"
        f"  authorization {{\n    user: {q(ROUTE_USER)}\n"
        f"    password: {q(cluster.password)}\n    timeout: 10\n  }}\n"
        f"  routes: [\n{routes}\n  ]\n}}\n"
    )


def write(
    directory: Path,
    port: int,
    monitor: int,
    store_dir: Path,
    users: Mapping[str, nats_permissions.Permissions] = STACK_USERS,
    cluster: Cluster | None = None,
) -> NatsConfig:
    """Write `<directory>/nats.conf` (with its CA, serving cert and saved passwords) and return it.

    With `cluster`, `<directory>/nats-<server_name>.conf`: a cluster's nodes share the directory,
    so they share the CA, the serving certificate (it covers 127.0.0.1, every node's address)
    and the passwords, the routes' too."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    tls = _serving_certs(directory)
    passwords = _passwords(directory / "passwords.json", [*users, *([ROUTE_USER] if cluster else [])])
    path = directory / (f"nats-{cluster.server_name}.conf" if cluster else "nats.conf")
    if cluster:
        cluster = replace(cluster, password=passwords[ROUTE_USER])
    granted = {u: (passwords[u], p) for u, p in users.items()}
    text = render(port, monitor, store_dir, tls, granted, cluster)
    _private(path, text)
    return NatsConfig(path=path, port=port, ca_cert=tls.ca_cert, passwords=passwords)
