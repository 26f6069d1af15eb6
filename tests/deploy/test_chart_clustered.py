"""The chart on clustered servers (issue 15): a NATS cluster's server list, JetStream replicas,
a Redis Cluster and a multi-host Postgres DSN reach exactly the pods that use them (the operator
and the collector; the workers only the NATS list), parse as the settings model reads them, are
refused by the schema when mistyped, and the worked example of docs/operations.md renders and
passes a server-side dry run."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mljob import settings as mljob_settings
from mljob.transport import natsconn
from support.chart import CHART, docs, env_of, find, helm, one, render, schema_refusal
from support.stack import Kubectl

OPERATOR = "rel-mljob-operator"
COLLECTOR = "rel-mljob-operator-collector"
WORKER = "rel-mljob-operator-worker-thumbs"
OPERATIONS = CHART.parents[1] / "docs" / "operations.md"

NATS_URLS = "tls://nats-0.nats:4222,tls://nats-1.nats:4222,tls://nats-2.nats:4222"
REDIS_NODE = "redis://redis-cluster-0.redis-cluster:6379"
PG_DSN = "postgresql://mljob@pg-0.pg:5432,pg-1.pg:5432/mljob?target_session_attrs=read-write"
CLUSTERED: dict[str, Any] = {
    "collector": {"enabled": True},
    "nats": {"url": NATS_URLS, "streamReplicas": 3},
    "redis": {"url": REDIS_NODE, "cluster": True},
    "postgres": {"dsn": PG_DSN},
    "workers": [{"pipeline": "thumbs", "handler": "mypkg.handlers:thumb"}],
}
#: What only the stores' pods get: workers never create streams nor open Redis.
STORE_VARS = ("MLJOB_STREAM_REPLICAS", "MLJOB_REDIS_CLUSTER", "MLJOB_REDIS_URL", "MLJOB_POSTGRES_DSN")


def deployments(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in find(docs(render(values)), "Deployment")}


# ---------------------------------------------------------------------------------- render


def test_clustered_values_reach_the_operator_and_collector_and_the_server_list_every_pod() -> None:
    found = deployments(CLUSTERED)
    assert set(found) == {OPERATOR, COLLECTOR, WORKER}
    for name in (OPERATOR, COLLECTOR):
        env = env_of(found[name])
        assert env["MLJOB_NATS_URL"] == NATS_URLS, name
        assert env["MLJOB_STREAM_REPLICAS"] == "3", name
        assert env["MLJOB_REDIS_URL"] == REDIS_NODE, name
        assert env["MLJOB_REDIS_CLUSTER"] == "true", name
        assert env["MLJOB_POSTGRES_DSN"] == PG_DSN, name
        assert "MLJOB_CONSUMER_REPLICAS" not in env, f"{name}: null means the stream's count"
    worker = env_of(found[WORKER])
    assert worker["MLJOB_NATS_URL"] == NATS_URLS
    assert not [v for v in (*STORE_VARS, "MLJOB_CONSUMER_REPLICAS") if v in worker]


def test_defaults_render_one_replica_and_a_single_redis_server() -> None:
    found = deployments({"collector": {"enabled": True}})
    for name in (OPERATOR, COLLECTOR):
        env = env_of(found[name])
        assert (env["MLJOB_STREAM_REPLICAS"], env["MLJOB_REDIS_CLUSTER"]) == ("1", "false"), name
        assert "MLJOB_CONSUMER_REPLICAS" not in env, name


def test_consumer_replicas_when_set_go_to_the_operator_only() -> None:
    found = deployments({**CLUSTERED, "nats": {**CLUSTERED["nats"], "consumerReplicas": 3}})
    assert env_of(found[OPERATOR])["MLJOB_CONSUMER_REPLICAS"] == "3"
    assert "MLJOB_CONSUMER_REPLICAS" not in env_of(found[COLLECTOR])
    assert "MLJOB_CONSUMER_REPLICAS" not in env_of(found[WORKER])


def test_connections_from_secrets_keep_the_cluster_settings_as_values() -> None:
    values = {
        "collector": {"enabled": True},
        "nats": {"url": "", "existingSecret": {"name": "conn", "key": "nats"}, "streamReplicas": 3},
        "redis": {"url": "", "existingSecret": {"name": "conn", "key": "redis"}, "cluster": True},
        "postgres": {"dsn": "", "existingSecret": {"name": "conn", "key": "dsn"}},
    }
    for name, deploy in deployments(values).items():
        env = env_of(deploy)
        assert env["MLJOB_NATS_URL"] == {"secretKeyRef": {"name": "conn", "key": "nats"}}, name
        assert env["MLJOB_POSTGRES_DSN"] == {"secretKeyRef": {"name": "conn", "key": "dsn"}}, name
        assert (env["MLJOB_STREAM_REPLICAS"], env["MLJOB_REDIS_CLUSTER"]) == ("3", "true"), name


def _plain_env(deploy: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in env_of(deploy).items() if isinstance(v, str)}


@pytest.mark.parametrize(
    ("deployment", "model"),
    [
        (OPERATOR, mljob_settings.OperatorSettings),
        (COLLECTOR, mljob_settings.CollectorSettings),
        (WORKER, mljob_settings.WorkerSettings),
    ],
    ids=["operator", "collector", "worker"],
)
def test_rendered_variables_parse_as_each_process_reads_them(
    monkeypatch: pytest.MonkeyPatch, deployment: str, model: type[mljob_settings.NatsSettings]
) -> None:
    for name in [n for n in os.environ if n.startswith(mljob_settings.PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in _plain_env(deployments(CLUSTERED)[deployment]).items():
        monkeypatch.setenv(name, value)
    flags = {"pipeline": "thumbs"} if model is mljob_settings.WorkerSettings else {}
    loaded = mljob_settings.load(model, **flags)
    assert natsconn.servers(loaded.nats_url) == NATS_URLS.split(",")
    if isinstance(loaded, mljob_settings.CollectorSettings):
        assert loaded.stream_replicas == 3
        assert loaded.redis_cluster is True
        assert loaded.postgres_dsn == PG_DSN
    if isinstance(loaded, mljob_settings.OperatorSettings):
        assert loaded.consumer_replicas is None


# ---------------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nats": {"streamReplicas": "three"}}, "at '/nats/streamReplicas': got string, want integer"),
        ({"nats": {"streamReplicas": 2.5}}, "at '/nats/streamReplicas': got number, want integer"),
        ({"nats": {"streamReplicas": 0}}, "at '/nats/streamReplicas': minimum: got 0, want 1"),
        ({"nats": {"streamReplicas": 7}}, "at '/nats/streamReplicas': maximum: got 7, want 5"),
        (
            {"nats": {"consumerReplicas": "all"}},
            "at '/nats/consumerReplicas': got string, want null or integer",
        ),
        ({"nats": {"consumerReplicas": 0}}, "at '/nats/consumerReplicas': minimum: got 0, want 1"),
        ({"redis": {"cluster": "yes"}}, "at '/redis/cluster': got string, want boolean"),
        (
            {"redis": {"cluster": True, "url": "redis://redis-cluster-0:6379/2"}},
            "at '/redis/url': 'redis://redis-cluster-0:6379/2' does not match pattern",
        ),
    ],
    ids=[
        "stream-string",
        "stream-fraction",
        "stream-zero",
        "stream-over-five",
        "consumer-string",
        "consumer-zero",
        "redis-cluster-string",
        "redis-cluster-database",
    ],
)
def test_schema_refuses_mistyped_cluster_values_naming_them(values: dict[str, Any], message: str) -> None:
    stderr = schema_refusal(values)
    assert message in stderr, stderr


def test_schema_accepts_a_cluster_node_with_database_zero_or_none_and_credentials() -> None:
    for url in (
        "redis://redis-cluster-0:6379",
        "redis://redis-cluster-0:6379/",
        "redis://redis-cluster-0:6379/0",
        "rediss://mljob:s3cret@redis-cluster-0:6379/0?ssl_cert_reqs=required",
    ):
        env = env_of(one(docs(render({"redis": {"cluster": True, "url": url}})), "Deployment"))
        assert env["MLJOB_REDIS_URL"] == url
    # A single server may use any database.
    render({"redis": {"url": "redis://redis:6379/3"}})


# ---------------------------------------------------------------------------------- the docs' example


def worked_example() -> tuple[str, dict[str, Any]]:
    """The values file of docs/operations.md "Running on clustered servers" (its first yaml block)."""
    text = OPERATIONS.read_text()
    section = text.split("## Running on clustered servers\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match, "the section has a yaml block"
    values: dict[str, Any] = yaml.safe_load(match.group(1))
    return match.group(1), values


def test_docs_worked_example_renders_the_clustered_settings(tmp_path: Path) -> None:
    text, values = worked_example()
    assert values["nats"]["streamReplicas"] == 3 and values["redis"]["cluster"] is True
    assert len(values["nats"]["url"].split(",")) == 3
    assert "target_session_attrs=read-write" in values["postgres"]["dsn"]
    file = tmp_path / "values-clustered.yaml"
    file.write_text(text)
    manifest = helm("template", "mljob-operator", str(CHART), "-n", "mljob", "-f", str(file)).stdout
    found = {d["metadata"]["name"]: d for d in find(docs(manifest), "Deployment")}
    assert set(found) == {"mljob-operator", "mljob-operator-collector"}
    for deploy in found.values():
        env = env_of(deploy)
        assert env["MLJOB_NATS_URL"] == values["nats"]["url"]
        assert env["MLJOB_STREAM_REPLICAS"] == "3"
        assert env["MLJOB_REDIS_URL"] == values["redis"]["url"]
        assert env["MLJOB_REDIS_CLUSTER"] == "true"
        assert env["MLJOB_POSTGRES_DSN"] == values["postgres"]["dsn"]
        assert "MLJOB_CONSUMER_REPLICAS" not in env


def test_docs_worked_example_passes_a_server_side_dry_run(
    kubectl: Kubectl, crd_installed: None, namespace: str, tmp_path: Path
) -> None:
    text, _values = worked_example()
    file = tmp_path / "values-clustered.yaml"
    file.write_text(text)
    manifest = render({"admissionPolicy": {"enabled": False}}, "-f", str(file), namespace=namespace)
    proc = kubectl.run("apply", "--dry-run=server", "-f", "-", stdin=manifest, check=False)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.count("(server dry run)") == len(docs(manifest)), proc.stdout
