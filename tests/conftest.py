"""Shared fixtures: one real local stack per test session, isolation by namespace/schema/prefix.

`make test` starts the stack and exports its environment; run bare, pytest starts its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from mljob.adapters.redis_state import JobState
from mljob.adapters.results_store import ResultsStore, make_pool
from mljob.db.migrate import apply_migrations
from support.harness import ROLE_VARS, connect_nats, nats_identity

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from support.env import E2E

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = ROOT / "crds"
SERVICE_VARS = ("KUBECONFIG", "MLJOB_NATS_URL", "MLJOB_REDIS_URL", "MLJOB_POSTGRES_DSN")
#: The stack's NATS settings besides the URL: the default (operator) identity, the CA, the
#: other roles' identities.
NATS_VARS = (
    "MLJOB_NATS_USER",
    "MLJOB_NATS_PASSWORD",
    "MLJOB_NATS_TLS_CA_FILE",
    *(v for pair in ROLE_VARS.values() for v in pair),
)


@dataclass(frozen=True)
class StackEnv:
    kubeconfig: str
    nats_url: str
    nats_monitor_url: str
    redis_url: str
    postgres_dsn: str
    directory: str
    #: NATS_VARS and the ROLE_VARS, as the stack exported them
    nats_vars: dict[str, str] = field(default_factory=dict)

    def as_env(self, role: str = "operator") -> dict[str, str]:
        """The environment of a process of `role` (operator, collector or worker): the stack's
        addresses and that role's NATS identity."""
        return {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "MLJOB_REDIS_URL": self.redis_url,
            "MLJOB_POSTGRES_DSN": self.postgres_dsn,
            **self.nats_vars,
            **self.nats_identity(role),
        }

    def nats_identity(self, role: str = "operator") -> dict[str, str]:
        """The MLJOB_NATS_* variables a process of `role` runs with (operator, collector, worker)."""
        return nats_identity({"MLJOB_NATS_URL": self.nats_url, **self.nats_vars}, role)

    async def nats(self, role: str = "admin", **options: Any) -> NATS:
        """A NATS connection of `role` (default: the stack's admin, for a test's own setup and
        inspection), with the stack's credentials and CA."""
        return await connect_nats({"MLJOB_NATS_URL": self.nats_url, **self.nats_vars}, role, **options)


@pytest.fixture(scope="session")
def stack() -> Iterator[StackEnv]:
    """The running local stack: the one `make test` started, or a fresh one for this session."""
    from mljob_dev.devstack import stack as devstack

    owned = None
    if all(os.environ.get(v) for v in SERVICE_VARS) and os.environ.get("MLJOB_STACK_DIR"):
        env = dict(os.environ)
    else:
        owned = devstack.up()
        env = owned.env
    yield StackEnv(
        kubeconfig=env["KUBECONFIG"],
        nats_url=env["MLJOB_NATS_URL"],
        nats_monitor_url=env.get("MLJOB_NATS_MONITOR_URL", ""),
        redis_url=env["MLJOB_REDIS_URL"],
        postgres_dsn=env["MLJOB_POSTGRES_DSN"],
        directory=env["MLJOB_STACK_DIR"],
        nats_vars={k: env[k] for k in NATS_VARS if env.get(k)},
    )
    if owned is not None:
        owned.stop()


class Kubectl:
    """kubectl against the test stack; returns CompletedProcess so tests can read stderr."""

    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = kubeconfig

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        kubeconfig = self.kubeconfig if token is None else self._token_kubeconfig(token)
        cmd = ["kubectl", f"--kubeconfig={kubeconfig}", *args]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def _token_kubeconfig(self, token: str) -> str:
        """A kubeconfig that authenticates by bearer token only (no admin client certificate)."""
        config = json.loads(Path(self.kubeconfig).read_text())
        config["users"] = [{"name": "mljob-admin", "user": {"token": token}}]
        path = Path(self.kubeconfig).with_name(f"kubeconfig-token-{uuid.uuid4().hex[:8]}")
        path.write_text(json.dumps(config))
        return str(path)

    def json(self, *args: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self.run(*args, "-o", "json").stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def kubectl(stack: StackEnv) -> Kubectl:
    return Kubectl(stack.kubeconfig)


@pytest.fixture(scope="session")
def crd_installed(kubectl: Kubectl) -> None:
    """The committed CRD, applied and Established."""
    kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "crd/mljobs.mljob.dev")
    from support.harness import wait_for

    # discovery lags Established by a moment
    wait_for(
        lambda: kubectl.run("get", "mljobs", "-A", check=False).returncode == 0,
        30,
        what="the mljobs resource to become servable",
    )


@pytest.fixture
def namespace(kubectl: Kubectl) -> str:
    """A fresh namespace per test (no namespace controller runs, so it is not deleted)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kubectl.run("create", "namespace", name)
    return name


@pytest.fixture
def pg_schema(stack: StackEnv) -> Iterator[str]:
    """A fresh Postgres schema name per test; dropped afterwards."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def e2e(
    stack: StackEnv, kubectl: Kubectl, crd_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[E2E]:
    """One operator per test module, watching its own namespace (see support.env)."""
    from support.env import make_e2e

    env_iter = make_e2e(stack, kubectl, Path(tmp_path_factory.mktemp("e2e")))
    env = next(env_iter)
    env.start_operator()
    yield env
    next(env_iter, None)


@pytest.fixture
async def redis(stack: StackEnv) -> AsyncIterator[Redis]:
    """An async Redis client on the stack."""
    client = Redis.from_url(stack.redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    """A key prefix of this test only; its keys (and only those) are removed afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    keys = [k async for k in redis.scan_iter(match=f"{name}:*", count=1000)]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
async def nc(stack: StackEnv) -> AsyncIterator[NATS]:
    """A NATS connection as the stack's admin identity (streams, consumers, any subject)."""
    client = await stack.nats()
    yield client
    await client.close()


@pytest.fixture
def state(redis: Redis, prefix: str) -> JobState:
    return JobState(redis, prefix=prefix)


@pytest.fixture
async def store(stack: StackEnv, pg_schema: str) -> AsyncIterator[ResultsStore]:
    """A ResultsStore on a fresh, migrated schema."""
    import psycopg

    with psycopg.connect(stack.postgres_dsn) as conn:
        apply_migrations(conn, schema=pg_schema)
    pool = make_pool(stack.postgres_dsn, pg_schema, max_size=4)
    await pool.open()
    yield ResultsStore(pool)
    await pool.close()
