"""The chart's NATS identities: one per role (operator, collector, workers, a worker's own), each a
.creds file or a user and password from a Secret, never both; with a `tls://` URL and a CA too.
Rendered, refused by the schema, accepted by the real apiserver, and warned about in NOTES."""

from __future__ import annotations

import json
from typing import Any

import pytest

from support.chart import CHART, container, docs, env_of, find, helm, one, render, schema_refusal, set_args
from support.stack import Kubectl, StackEnv

CREDS_FILE = "/etc/mljob/nats-creds/nats.creds"
AUTH_VARS = ("MLJOB_NATS_CREDS_FILE", "MLJOB_NATS_USER", "MLJOB_NATS_PASSWORD")
OPERATOR = "rel-mljob-operator"
COLLECTOR = "rel-mljob-operator-collector"


def creds(name: str, key: str = "nats.creds") -> dict[str, Any]:
    return {"credsSecret": {"name": name, "key": key}}


def user(name: str, user_key: str = "user", password_key: str = "password") -> dict[str, Any]:
    return {"userSecret": {"name": name, "userKey": user_key, "passwordKey": password_key}}


def workers(*entries: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"pipeline": "thumbs", "handler": "mypkg.handlers:thumb"}, *entries]


#: Every role with a .creds file; the ocr workers with their own, the thumbs workers the default.
CREDS: dict[str, Any] = {
    "collector": {"enabled": True},
    "nats": {
        "credentials": {
            "operator": creds("nats-operator"),
            "collector": creds("nats-collector", key="collector.creds"),
            "workers": creds("nats-worker"),
        }
    },
    "workers": workers(
        {"pipeline": "ocr", "handler": "ocrpkg.run:page", "natsCredentials": creds("nats-worker-ocr")}
    ),
}
#: Every role with a user and password; the ocr workers' own Secret names other keys.
USERS: dict[str, Any] = {
    "collector": {"enabled": True},
    "nats": {
        "credentials": {
            "operator": user("nats-operator"),
            "collector": user("nats-collector"),
            "workers": user("nats-worker"),
        }
    },
    "workers": workers(
        {
            "pipeline": "ocr",
            "handler": "ocrpkg.run:page",
            "natsCredentials": user("nats-worker-ocr", "name", "secret"),
        }
    ),
}
#: `tls://` from a Secret, a CA, and identities of both kinds.
TLS: dict[str, Any] = {
    "collector": {"enabled": True},
    "nats": {
        "url": "",
        "existingSecret": {"name": "mljob-conn", "key": "nats"},
        "tls": {"caSecret": {"name": "nats-ca", "key": "ca.crt"}},
        "credentials": {
            "operator": creds("nats-operator"),
            "collector": user("nats-collector"),
            "workers": creds("nats-worker"),
        },
    },
    "workers": workers(),
}


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def volume(deployment: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in pod(deployment).get("volumes", []) if v["name"] == name), None)


def mounts(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container(deployment).get("volumeMounts", [])}


def assert_creds_file(deployment: dict[str, Any], secret: str, key: str = "nats.creds") -> None:
    """The Secret's key as a read-only 0400 file at the fixed path the env names, readable by
    the pod's user through its fsGroup, and no user/password."""
    env = env_of(deployment)
    assert env["MLJOB_NATS_CREDS_FILE"] == CREDS_FILE
    assert "MLJOB_NATS_USER" not in env and "MLJOB_NATS_PASSWORD" not in env
    assert volume(deployment, "nats-creds") == {
        "name": "nats-creds",
        "secret": {"secretName": secret, "defaultMode": 0o400, "items": [{"key": key, "path": "nats.creds"}]},
    }
    assert mounts(deployment)["nats-creds"] == {
        "name": "nats-creds",
        "mountPath": "/etc/mljob/nats-creds",
        "readOnly": True,
    }
    # 0400 is the owner's only; the kubelet makes a secret file root:<fsGroup> and adds group
    # read, so uid 10001 reads it through fsGroup 10001.
    security = pod(deployment)["securityContext"]
    assert (security["runAsUser"], security["fsGroup"]) == (10001, 10001)


def assert_user_password(
    deployment: dict[str, Any], secret: str, user_key: str = "user", password_key: str = "password"
) -> None:
    env = env_of(deployment)
    assert env["MLJOB_NATS_USER"] == {"secretKeyRef": {"name": secret, "key": user_key}}
    assert env["MLJOB_NATS_PASSWORD"] == {"secretKeyRef": {"name": secret, "key": password_key}}
    assert "MLJOB_NATS_CREDS_FILE" not in env
    assert volume(deployment, "nats-creds") is None and "nats-creds" not in mounts(deployment)


# ---------------------------------------------------------------------------------- render


def test_without_credentials_no_pod_gets_nats_auth() -> None:
    objs = docs(render({"collector": {"enabled": True}, "workers": workers()}))
    deployments = find(objs, "Deployment")
    assert len(deployments) == 3
    for deploy in deployments:
        assert not set(AUTH_VARS) & set(env_of(deploy)), deploy["metadata"]["name"]
        assert volume(deploy, "nats-creds") is None


def test_creds_files_give_each_role_its_own_identity() -> None:
    objs = docs(render(CREDS))
    assert_creds_file(one(objs, "Deployment", OPERATOR), "nats-operator")
    assert_creds_file(one(objs, "Deployment", COLLECTOR), "nats-collector", key="collector.creds")
    assert_creds_file(one(objs, "Deployment", f"{OPERATOR}-worker-thumbs"), "nats-worker")
    assert_creds_file(one(objs, "Deployment", f"{OPERATOR}-worker-ocr"), "nats-worker-ocr")


def test_user_and_password_come_from_secret_key_refs() -> None:
    objs = docs(render(USERS))
    assert_user_password(one(objs, "Deployment", OPERATOR), "nats-operator")
    assert_user_password(one(objs, "Deployment", COLLECTOR), "nats-collector")
    assert_user_password(one(objs, "Deployment", f"{OPERATOR}-worker-thumbs"), "nats-worker")
    assert_user_password(
        one(objs, "Deployment", f"{OPERATOR}-worker-ocr"), "nats-worker-ocr", "name", "secret"
    )


def test_a_worker_identity_replaces_the_default_whole_and_keys_default_when_left_out() -> None:
    """`--set-json` of a list replaces it: a worker's identity may name only its Secret."""
    values = {
        "nats": {"credentials": {"workers": user("nats-worker")}},
        "workers": workers(
            {"pipeline": "ocr", "handler": "m:f", "natsCredentials": {"credsSecret": {"name": "o"}}}
        ),
    }
    objs = docs(render(values))
    assert_user_password(one(objs, "Deployment", f"{OPERATOR}-worker-thumbs"), "nats-worker")
    assert_creds_file(one(objs, "Deployment", f"{OPERATOR}-worker-ocr"), "o")
    # An identity that names no Secret leaves the worker on the default.
    empty = {"credsSecret": {"name": ""}, "userSecret": {"name": ""}}
    objs = docs(
        render(
            {**values, "workers": workers({"pipeline": "ocr", "handler": "m:f", "natsCredentials": empty})}
        )
    )
    assert_user_password(one(objs, "Deployment", f"{OPERATOR}-worker-ocr"), "nats-worker")


def test_the_operator_identity_serves_the_in_process_collector() -> None:
    values = {
        "nats": {"credentials": {"operator": creds("nats-operator"), "collector": creds("nats-collector")}}
    }
    objs = docs(render(values))
    assert not find(objs, "Deployment", COLLECTOR)
    deploy = one(objs, "Deployment", OPERATOR)
    assert "--no-collector" not in container(deploy)["args"]
    assert_creds_file(deploy, "nats-operator")


def test_tls_url_ca_and_credentials_combine() -> None:
    objs = docs(render(TLS))
    for name, kind in [
        (OPERATOR, "creds"),
        (COLLECTOR, "user"),
        (f"{OPERATOR}-worker-thumbs", "creds"),
    ]:
        deploy = one(objs, "Deployment", name)
        env = env_of(deploy)
        assert env["MLJOB_NATS_URL"] == {"secretKeyRef": {"name": "mljob-conn", "key": "nats"}}
        assert env["MLJOB_NATS_TLS_CA_FILE"] == "/etc/mljob/tls/nats/ca.crt"
        assert volume(deploy, "tls-nats") == {
            "name": "tls-nats",
            "secret": {"secretName": "nats-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
        }
        assert mounts(deploy)["tls-nats"]["mountPath"] == "/etc/mljob/tls/nats"
        if kind == "creds":
            assert_creds_file(deploy, "nats-worker" if "worker" in name else "nats-operator")
        else:
            assert_user_password(deploy, "nats-collector")
        paths = [m["mountPath"] for m in mounts(deploy).values()]
        assert len(paths) == len(set(paths))


def test_plain_url_with_tls_scheme_and_credentials_renders() -> None:
    values = {
        "nats": {"url": "tls://nats.messaging:4222", "credentials": {"operator": user("nats-operator")}}
    }
    deploy = one(docs(render(values)), "Deployment", OPERATOR)
    assert env_of(deploy)["MLJOB_NATS_URL"] == "tls://nats.messaging:4222"
    assert_user_password(deploy, "nats-operator")


def test_helm_lint_passes_with_credentials() -> None:
    for values in (CREDS, USERS, TLS):
        proc = helm("lint", "--strict", str(CHART), *set_args(values), check=False)
        assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}"


# ---------------------------------------------------------------------------------- refusals

BOTH = {**creds("a"), **user("b")}


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"nats": {"credentials": {"operator": BOTH}}}, "nats.credentials.operator"),
        (
            {"collector": {"enabled": True}, "nats": {"credentials": {"collector": BOTH}}},
            "nats.credentials.collector",
        ),
        ({"nats": {"credentials": {"workers": BOTH}}, "workers": workers()}, "nats.credentials.workers"),
        (
            {"workers": workers({"pipeline": "ocr", "handler": "m:f", "natsCredentials": BOTH})},
            "workers[ocr].natsCredentials",
        ),
    ],
    ids=["operator", "collector", "workers", "one-worker"],
)
def test_both_a_creds_file_and_a_user_for_one_role_are_refused(values: dict[str, Any], where: str) -> None:
    stderr = schema_refusal(values)
    pointer = "/" + where.replace(".", "/").replace("workers[ocr]", "workers/1")
    assert f"at '{pointer}/userSecret/name': value must be ''" in stderr, stderr

    # Without the schema (--skip-schema-validation) the template refuses it and says what to fix.
    proc = helm("template", "rel", str(CHART), "--skip-schema-validation", *set_args(values), check=False)
    assert proc.returncode != 0
    assert f'{where}: both credsSecret.name ("a") and userSecret.name ("b") are set' in proc.stderr
    assert 'set the other name to ""' in proc.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"nats": {"credentials": {"operator": {"userSecret": {"name": "u", "password": "hunter2"}}}}},
            "at '/nats/credentials/operator/userSecret': additional properties 'password' not allowed",
        ),
        (
            {"nats": {"credentials": {"operator": {"password": "hunter2"}}}},
            "at '/nats/credentials/operator': additional properties 'password' not allowed",
        ),
        (
            {"nats": {"credentials": {"collector": {"credsSecret": {"name": "c", "key": ""}}}}},
            "at '/nats/credentials/collector/credsSecret/key': minLength: got 0, want 1",
        ),
        (
            {"nats": {"credentials": {"workers": {"userSecret": {"name": "w", "passwordKey": ""}}}}},
            "at '/nats/credentials/workers/userSecret/passwordKey': minLength: got 0, want 1",
        ),
        (
            {"nats": {"credentials": {"worker": creds("w")}}},
            "at '/nats/credentials': additional properties 'worker' not allowed",
        ),
        (
            {"nats": {"credentials": {"operator": {"credsSecret": "nats-operator"}}}},
            "at '/nats/credentials/operator/credsSecret': got string, want object",
        ),
        (
            {"workers": [{"pipeline": "p", "handler": "m:f", "natsCredentials": {"user": "w"}}]},
            "at '/workers/0/natsCredentials': additional properties 'user' not allowed",
        ),
    ],
    ids=[
        "plain-password",
        "password-on-role",
        "empty-key",
        "empty-password-key",
        "unknown-role",
        "not-object",
        "worker-plain",
    ],
)
def test_schema_refuses_bad_credentials_naming_the_field(values: dict[str, Any], message: str) -> None:
    stderr = schema_refusal(values)
    assert message in stderr, stderr


# ---------------------------------------------------------------------------------- real apiserver


@pytest.mark.parametrize(
    ("values", "creds_files"), [(CREDS, 4), (USERS, 0), (TLS, 2)], ids=["creds", "users", "tls"]
)
def test_credential_manifests_pass_a_server_side_dry_run(
    kubectl: Kubectl, crd_installed: None, namespace: str, values: dict[str, Any], creds_files: int
) -> None:
    manifest = render(values, namespace=namespace)
    proc = kubectl.run("apply", "--dry-run=server", "-o", "json", "-f", "-", stdin=manifest, check=False)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    returned = json.loads(proc.stdout)
    objs = returned["items"] if returned.get("kind") == "List" else [returned]
    assert len(objs) == len(docs(manifest))
    # What the apiserver would store: the mode is 0400 (YAML's octal 0400, not decimal 400).
    with_file = [d for d in find(objs, "Deployment") if volume(d, "nats-creds")]
    assert len(with_file) == creds_files
    for deploy in with_file:
        assert volume(deploy, "nats-creds")["secret"]["defaultMode"] == 0o400  # type: ignore[index]
        assert mounts(deploy)["nats-creds"]["readOnly"] is True


def _notes(stack: StackEnv, values: dict[str, Any]) -> str:
    """NOTES.txt as `helm install` prints it (a client dry run: nothing is created)."""
    out = helm(
        "install",
        "rel",
        str(CHART),
        "--dry-run=client",
        "-n",
        "mljob",
        *set_args({"admissionPolicy": {"enabled": False}, **values}),
        kubeconfig=stack.kubeconfig,
    ).stdout
    return out.partition("NOTES:")[2]


def test_notes_warn_about_roles_without_nats_credentials(stack: StackEnv) -> None:
    notes = _notes(stack, {"collector": {"enabled": True}, "workers": workers()})
    assert "WARNING: no NATS credentials for: operator, collector, worker thumbs." in notes
    assert "any client that reaches NATS can publish tasks and forge results" in notes
    assert "python -m mljob.ops.permissions --role worker --pipeline P" in notes

    # Only the one role left without an identity is named.
    partial = {
        "collector": {"enabled": True},
        "nats": {"credentials": {"operator": creds("o"), "workers": user("w")}},
        "workers": workers(),
    }
    assert "WARNING: no NATS credentials for: collector." in _notes(stack, partial)

    for values in (CREDS, USERS, TLS):
        assert "WARNING" not in _notes(stack, values)


def test_notes_warn_when_a_creds_file_has_no_fs_group_to_be_read_through(stack: StackEnv) -> None:
    no_fs_group = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": None}
    notes = _notes(stack, {**CREDS, "podSecurityContext": no_fs_group})
    assert "podSecurityContext.fsGroup is not set" in notes
    assert "fsGroup is not set" not in _notes(stack, {**USERS, "podSecurityContext": no_fs_group})
