"""The one settings model: booleans as people write them, refusals naming the variable, flags over
the environment, and the README's table kept equal to the model."""

from __future__ import annotations

import re

import pytest

from mljob.cli import main as cli
from mljob.settings import (
    CollectorSettings,
    OperatorSettings,
    SettingsError,
    WorkerSettings,
    env_name,
    load,
    markdown_table,
    rows,
)
from support.stack import ROOT

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from the defaults: no MLJOB_* variable of the session's stack leaks in."""
    for info in [*OperatorSettings.model_fields.values(), *WorkerSettings.model_fields.values()]:
        monkeypatch.delenv(env_name(info), raising=False)
    monkeypatch.delenv("HOSTNAME", raising=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *((text, True) for text in ("true", "True", "TRUE", "1", "yes", "on")),
        *((text, False) for text in ("false", "False", "0", "no", "off")),
    ],
)
def test_booleans_as_people_write_them(monkeypatch: pytest.MonkeyPatch, text: str, expected: bool) -> None:
    monkeypatch.setenv("MLJOB_RUN_COLLECTOR", text)
    monkeypatch.setenv("MLJOB_LEADER_ELECTION", text)
    settings = load(OperatorSettings)
    assert (settings.run_collector, settings.leader_election) == (expected, expected)


def test_defaults_are_the_documented_ones() -> None:
    settings = load(OperatorSettings)
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.postgres_dsn == "postgresql://postgres@127.0.0.1:5432/mljob"
    assert settings.postgres_schema is None
    assert (settings.redis_prefix, settings.reconcile_interval, settings.dispatch_chunk) == ("mljob", 5, 1000)
    assert (settings.stream_replicas, settings.max_ack_pending, settings.run_collector) == (1, 1000, True)
    assert (settings.namespaces, settings.leader_election, settings.actor) == ([], False, "mljob-operator")
    assert settings.max_stream_recreations == 3
    assert (settings.orphan_sweep_interval, settings.orphan_grace_seconds) == (60, 300)
    assert (settings.collector_batch, settings.log_level) == (256, "INFO")


def test_lists_optionals_and_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLJOB_NAMESPACES", "team-a, team-b,,")
    monkeypatch.setenv("MLJOB_POSTGRES_SCHEMA", "")
    monkeypatch.setenv("HOSTNAME", "mljob-operator-7d9f")
    monkeypatch.setenv("MLJOB_NATS_PASSWORD", "s3cret")
    settings = load(OperatorSettings)
    assert settings.namespaces == ["team-a", "team-b"]
    assert settings.postgres_schema is None
    assert settings.actor == "mljob-operator-7d9f"
    assert settings.nats_password is not None and settings.nats_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "MLJOB_RECONCILE_INTERVAL",
            "fast",
            "MLJOB_RECONCILE_INTERVAL: input should be a valid number, got 'fast'",
        ),
        ("MLJOB_RUN_COLLECTOR", "maybe", "MLJOB_RUN_COLLECTOR: input should be a valid boolean, got 'maybe'"),
        ("MLJOB_STREAM_REPLICAS", "0", "MLJOB_STREAM_REPLICAS: input should be greater than or equal to 1"),
        ("MLJOB_LOG_LEVEL", "loud", "MLJOB_LOG_LEVEL: input should be DEBUG, INFO, WARNING or ERROR"),
    ],
)
def test_invalid_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        load(OperatorSettings)
    assert str(refused.value).startswith(message)


def test_invalid_value_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mljob operator` / `mljob collector` refuse a bad value before connecting to anything."""
    monkeypatch.setenv("MLJOB_RECONCILE_INTERVAL", "fast")
    assert cli.main(["operator"]) == 2
    err = capsys.readouterr().err
    assert err == "error: MLJOB_RECONCILE_INTERVAL: input should be a valid number, got 'fast'\n"
    monkeypatch.setenv("MLJOB_STREAM_REPLICAS", "three")
    assert cli.main(["collector"]) == 2
    assert "MLJOB_STREAM_REPLICAS: input should be a valid integer" in capsys.readouterr().err


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLJOB_NATS_URL", "nats://from-env:4222")
    monkeypatch.setenv("MLJOB_RECONCILE_INTERVAL", "7")
    monkeypatch.setenv("MLJOB_RUN_COLLECTOR", "true")
    settings = load(
        OperatorSettings, nats_url="nats://from-flag:4222", reconcile_interval=None, run_collector=False
    )
    assert settings.nats_url == "nats://from-flag:4222"
    assert settings.reconcile_interval == 7  # flag not given: the environment's value
    assert settings.run_collector is False
    monkeypatch.setenv("MLJOB_COLLECTOR_BATCH", "64")
    assert load(CollectorSettings).collector_batch == 64
    assert load(CollectorSettings, collector_batch="32").collector_batch == 32


def test_a_bad_flag_is_named_as_the_flag() -> None:
    with pytest.raises(SettingsError, match=r"^--batch: input should be greater than or equal to 1, got '0'"):
        load(CollectorSettings, collector_batch="0")
    with pytest.raises(SettingsError, match=r"^--reconcile-interval: input should be a valid number"):
        load(OperatorSettings, reconcile_interval="soon")


def test_leader_election_defaults_are_client_go_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLJOB_POD_NAMESPACE", raising=False)
    settings = load(OperatorSettings)
    assert (settings.lease_name, settings.lease_namespace) == ("mljob-operator", "default")
    assert (
        settings.lease_duration_seconds,
        settings.renew_deadline_seconds,
        settings.retry_period_seconds,
    ) == (15, 10, 2)
    monkeypatch.setenv("MLJOB_POD_NAMESPACE", "ops")
    assert load(OperatorSettings).lease_namespace == "ops"
    monkeypatch.setenv("MLJOB_LEASE_NAMESPACE", "mljob")
    assert load(OperatorSettings).lease_namespace == "mljob"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"MLJOB_RENEW_DEADLINE_SECONDS": "15"},
            "MLJOB_RENEW_DEADLINE_SECONDS: must be shorter than MLJOB_LEASE_DURATION_SECONDS (15), got 15",
        ),
        (
            {"MLJOB_LEASE_DURATION_SECONDS": "3", "MLJOB_RENEW_DEADLINE_SECONDS": "5"},
            "MLJOB_RENEW_DEADLINE_SECONDS: must be shorter than MLJOB_LEASE_DURATION_SECONDS (3), got 5",
        ),
        (
            {"MLJOB_RETRY_PERIOD_SECONDS": "10"},
            "MLJOB_RETRY_PERIOD_SECONDS: must be shorter than MLJOB_RENEW_DEADLINE_SECONDS (10), got 10",
        ),
    ],
)
def test_lease_timings_that_could_let_two_lead_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load(OperatorSettings)
    assert str(refused.value).startswith(message)


def test_peering_is_a_deprecated_alias_of_leader_elect(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The flag (and MLJOB_PEERING) still turn HA on, with one warning; stopped before any I/O."""
    from mljob.controller import main as controller_main

    seen: list[bool] = []
    monkeypatch.setattr(
        controller_main, "run_operator", lambda config: seen.append(config.leader_election) or 0
    )
    monkeypatch.delenv("MLJOB_PEERING", raising=False)
    assert cli.main(["operator", "--peering"]) == 0
    assert cli.main(["operator", "--leader-elect"]) == 0
    assert cli.main(["operator"]) == 0
    monkeypatch.setenv("MLJOB_PEERING", "true")
    assert cli.main(["operator"]) == 0
    assert seen == [True, True, False, True]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert len(warnings) == 2 and "--leader-elect" in warnings[0]


def test_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match=r"^MLJOB_PIPELINE: required, not set \(or pass --pipeline\)"):
        load(WorkerSettings)
    monkeypatch.setenv("MLJOB_PIPELINE", "thumbnails")
    monkeypatch.setenv("MLJOB_WORKER_CONCURRENCY", "3")
    config = load(WorkerSettings, batch="4")
    assert (config.pipeline, config.concurrency, config.batch) == ("thumbnails", 3, 4)
    with pytest.raises(SettingsError, match="one NATS subject token expected"):
        load(WorkerSettings, pipeline="a.b")
    with pytest.raises(ValueError, match="greater than or equal to 1"):  # the SDK's WorkerConfig(...)
        WorkerSettings(pipeline="p", concurrency=0)


def readme_table() -> list[tuple[str, str, str, str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- settings-table[^>]*-->\n(.*?)<!-- end of settings-table -->", text, re.S)
    assert block is not None, "README.md lost its settings-table markers"
    found = []
    for line in block.group(1).splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, line
        found.append((cells[0], cells[1], cells[2], cells[3]))
    return found


def test_readme_table_matches_the_model() -> None:
    """Names, defaults, roles and docs: regenerate with `python -m mljob.settings` when this fails."""
    assert readme_table() == list(rows())
    assert markdown_table().count("\n") == len(readme_table()) + 2
