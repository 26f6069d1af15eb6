"""Build and cache the Go test-infrastructure binaries (kube-apiserver, etcd, nats-server, helm).

Nothing ships kube-apiserver as a package, so it is built from the Go module proxy through a
throw-away wrapper module. Binaries are cached outside the repository, keyed by version, so
a fresh machine builds them once and every later run reuses them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.5.35"
NATS_SERVER_VERSION = "v2.12.15"
HELM_VERSION = "v3.21.4"


class ToolError(RuntimeError):
    """A tool could not be found or built; the message says what to install."""


def cache_dir() -> Path:
    """Where built binaries live: outside the repo, reused across runs and clones."""
    base = os.environ.get("MLJOB_TOOLS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mljob-operator", "bin"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _go() -> str:
    go = shutil.which("go")
    if not go:
        raise ToolError("Go is required to build kube-apiserver, etcd, nats-server and helm: install Go 1.26")
    return go


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    merged = {**os.environ, "GOFLAGS": "-buildvcs=false", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=merged, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolError(f"command failed: {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


@dataclass(frozen=True)
class Tool:
    name: str
    version: str

    @property
    def path(self) -> Path:
        return cache_dir() / f"{self.name}-{self.version}"


def _staging_replacements(go: str, workdir: Path) -> list[str]:
    """The k8s.io staging modules of this Kubernetes release, read from its own go.mod."""
    out = _run([go, "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"], workdir)
    gomod = Path(json.loads(out)["GoMod"]).read_text()
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", gomod, re.M)))


def _build_kube(component: str, target: Path) -> None:
    """Build one Kubernetes component (kube-apiserver, kubelet, ...) at KUBERNETES_VERSION."""
    go = _go()
    minor = KUBERNETES_VERSION.lstrip("v").split(".")[1]
    staging_version = "v0." + ".".join(KUBERNETES_VERSION.lstrip("v").split(".")[1:])
    with tempfile.TemporaryDirectory(prefix="mljob-kube-build-") as tmp:
        work = Path(tmp)
        _run([go, "mod", "init", "mljob.dev/devtools/kube"], work)
        modules = _staging_replacements(go, work)
        edits = [f"-require=k8s.io/kubernetes@{KUBERNETES_VERSION}"]
        edits += [f"-replace={m}={m}@{staging_version}" for m in modules]
        _run([go, "mod", "edit", *edits], work)
        _run([go, "get", f"k8s.io/kubernetes/cmd/{component}@{KUBERNETES_VERSION}"], work)
        ldflags = " ".join(
            f"-X {pkg}.{key}={value}"
            for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
            for key, value in (
                ("gitVersion", KUBERNETES_VERSION),
                ("gitMajor", "1"),
                ("gitMinor", minor),
                ("gitTreeState", "clean"),
                ("buildDate", "1970-01-01T00:00:00Z"),
            )
        )
        _run(
            [
                go,
                "build",
                "-trimpath",
                "-ldflags",
                f"-s -w {ldflags}",
                "-o",
                str(target),
                f"k8s.io/kubernetes/cmd/{component}",
            ],
            work,
        )


def _build_etcd(target: Path) -> None:
    go = _go()
    with tempfile.TemporaryDirectory(prefix="mljob-etcd-build-") as tmp:
        work = Path(tmp)
        _run([go, "mod", "init", "mljob.dev/devtools/etcd"], work)
        (work / "main.go").write_text(
            'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
            "func main() { etcdmain.Main(os.Args) }\n"
        )
        _run([go, "get", f"go.etcd.io/etcd/server/v3@{ETCD_VERSION}"], work)
        _run([go, "mod", "tidy"], work)
        _run([go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(target), "."], work)


def _build_nats_server(target: Path) -> None:
    go = _go()
    with tempfile.TemporaryDirectory(prefix="mljob-nats-build-") as tmp:
        work = Path(tmp)
        _run(
            [go, "install", f"github.com/nats-io/nats-server/v2@{NATS_SERVER_VERSION}"],
            work,
            env={"GOBIN": str(work)},
        )
        shutil.move(str(work / "nats-server"), target)


def _helm_ldflags(go: str, workdir: Path) -> str:
    """The flags helm's own Makefile sets: its version, and the Kubernetes version it assumes.

    Without them `helm version` says "v3.x" and `helm lint`/`template` assume an old default
    Kubernetes version; the Kubernetes one is derived from helm's client-go like upstream does.
    """
    out = _run([go, "mod", "download", "-json", f"helm.sh/helm/v3@{HELM_VERSION}"], workdir)
    gomod = Path(json.loads(out)["GoMod"]).read_text()
    found = re.search(r"^\s*k8s\.io/client-go\s+v0\.(\d+)\.", gomod, re.M)
    if not found:
        raise ToolError(f"helm {HELM_VERSION}: no k8s.io/client-go requirement in its go.mod")
    k8s_major, k8s_minor = "1", found.group(1)
    flags = [
        f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
    ]
    for pkg in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {pkg}.k8sVersionMajor={k8s_major}", f"-X {pkg}.k8sVersionMinor={k8s_minor}"]
    return "-s -w " + " ".join(flags)


def _build_helm(target: Path) -> None:
    go = _go()
    with tempfile.TemporaryDirectory(prefix="mljob-helm-build-") as tmp:
        work = Path(tmp)
        ldflags = _helm_ldflags(go, work)
        _run(
            [go, "install", "-trimpath", "-ldflags", ldflags, f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"],
            work,
            env={"GOBIN": str(work), "CGO_ENABLED": "0"},
        )
        shutil.move(str(work / "helm"), target)


_BUILDERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "kube-apiserver": (KUBERNETES_VERSION, functools.partial(_build_kube, "kube-apiserver")),
    "etcd": (ETCD_VERSION, _build_etcd),
    "nats-server": (NATS_SERVER_VERSION, _build_nats_server),
    "helm": (HELM_VERSION, _build_helm),
}

# The node (`mljob dev stack up --node`): built only when a node is asked for, not by `make tools`.
NODE_TOOLS = ("kubelet", "kube-controller-manager", "kube-scheduler")
for _component in NODE_TOOLS:
    _BUILDERS[_component] = (KUBERNETES_VERSION, functools.partial(_build_kube, _component))


def ensure(name: str) -> Path:
    """Return the cached binary for `name`, building it first if this machine lacks it."""
    version, build = _BUILDERS[name]
    tool = Tool(name, version)
    if tool.path.exists():
        return tool.path
    # One partial file per process: two builds at once (make test beside a benchmark) must not
    # write, chmod and rename the same file.
    partial = tool.path.with_name(f"{tool.path.name}.{os.getpid()}.partial")
    print(f"building {name} {version} (once per machine, cached in {cache_dir()})", file=sys.stderr)
    build(partial)
    partial.chmod(0o755)
    partial.replace(tool.path)
    return tool.path


def ensure_all() -> dict[str, Path]:
    """The tools every test needs (the node's are built by `ensure_node`)."""
    return {name: ensure(name) for name in _BUILDERS if name not in NODE_TOOLS}


def ensure_node() -> dict[str, Path]:
    return {name: ensure(name) for name in NODE_TOOLS}


if __name__ == "__main__":
    names = sys.argv[1:] or list(_BUILDERS)
    for tool_name in names:
        print(ensure(tool_name))
