"""Build the project's image from its Dockerfile without a Docker engine (`mljob dev image build`),
and load it into the local node's containerd.

- The base: no registry is reachable, so the Dockerfile's `PYTHON_IMAGE` is a Debian bookworm
  made here by debootstrap with Debian's python3 (3.11, as the Dockerfile pins), venv and pip.
- The pod sandbox ("pause") image: Kubernetes' own pause.c of the stack's Kubernetes version,
  from the Go module cache, compiled static.
- The project's image: `buildah bud` of the Dockerfile as it is, only the base passed in.

buildah keeps its images under the tools cache (not the system's storage), so a machine builds
the base once. Needs root, and Debian's buildah and debootstrap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mljob_dev.devstack import node, tools
from mljob_dev.devstack.stack import StackError

ROOT = Path(__file__).resolve().parents[3]
#: The Dockerfile's PYTHON_IMAGE, made by debootstrap: Debian's python3 is 3.11 on bookworm.
BASE_IMAGE = "localhost/mljob-python:3.11-bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "python3-pip", "ca-certificates")
#: The project's image, as the node's pods name it (pullPolicy Never: only the loaded copy).
IMAGE = "localhost/mljob-operator:dev"
DEBIAN_PACKAGES = {"buildah": "buildah", "debootstrap": "debootstrap", "gcc": "gcc", "ctr": "containerd"}


def storage() -> Path:
    return tools.cache_dir().parent / "containers"


def _buildah(*args: str, capture: bool = True) -> str:
    cmd = [
        "buildah",
        "--root",
        str(storage() / "root"),
        "--runroot",
        str(storage() / "run"),
        "--storage-driver",
        "vfs",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=capture, text=True)
    if proc.returncode != 0:
        detail = f"\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}" if capture else ""
        raise StackError(f"{' '.join(cmd[:8])} ... {' '.join(args[:3])} failed{detail}")
    return proc.stdout if capture else ""


def check_host() -> None:
    if os.geteuid() != 0:
        raise StackError("building the image needs root (buildah's chroot, debootstrap)")
    missing = sorted({pkg for cmd, pkg in DEBIAN_PACKAGES.items() if not shutil.which(cmd)})
    if missing:
        raise StackError(f"building the image needs Debian packages: apt-get install {' '.join(missing)}")


def has_image(name: str) -> bool:
    out = _buildah("images", "--json")
    return any(name in (image.get("names") or []) for image in json.loads(out or "[]"))


def build_base() -> None:
    """Debian bookworm minbase with Debian's python3, once per machine."""
    if has_image(BASE_IMAGE):
        return
    print(f"building {BASE_IMAGE} with debootstrap (once per machine)", file=sys.stderr)
    container = _buildah("from", "scratch").strip()
    try:
        rootfs = Path(_buildah("mount", container).strip())
        proc = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "bookworm",
                str(rootfs),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise StackError(f"debootstrap failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        for cache in (rootfs / "var/cache/apt").glob("*.bin"):
            cache.unlink()
        _buildah(
            "config",
            "--env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env",
            "LANG=C.UTF-8",
            "--cmd",
            "python3",
            container,
        )
        _buildah("commit", "--quiet", container, BASE_IMAGE)
    finally:
        _buildah("rm", container)


def build_pause() -> None:
    """The pod sandbox image: Kubernetes' pause.c at the stack's version, static."""
    if has_image(node.PAUSE_IMAGE):
        return
    go = shutil.which("go")
    if not go:
        raise StackError("Go is needed to fetch Kubernetes' pause.c from the module proxy")
    with tempfile.TemporaryDirectory(prefix="mljob-pause-") as tmp:
        work = Path(tmp)
        subprocess.run(
            [go, "mod", "init", "mljob.dev/devtools/pause"], cwd=work, capture_output=True, check=True
        )
        out = subprocess.run(
            [go, "mod", "download", "-json", f"k8s.io/kubernetes@{tools.KUBERNETES_VERSION}"],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        source = Path(json.loads(out)["Dir"]) / "build" / "pause" / "linux" / "pause.c"
        binary = work / "pause"
        subprocess.run(
            [
                "gcc",
                "-Os",
                "-static",
                "-s",
                f"-DVERSION={tools.KUBERNETES_VERSION}",
                "-o",
                str(binary),
                str(source),
            ],
            capture_output=True,
            check=True,
        )
        container = _buildah("from", "scratch").strip()
        try:
            _buildah("copy", container, str(binary), "/pause")
            _buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535", container)
            _buildah("commit", "--quiet", container, node.PAUSE_IMAGE)
        finally:
            _buildah("rm", container)


def build(context: Path = ROOT, tag: str = IMAGE) -> None:
    """`buildah bud` of the Dockerfile as it is, on the debootstrap base.

    The RUN steps use the host's network (pip and apt reach their registries as the host does)
    and trust what the host trusts: the host's CA bundle is mounted for the build only (behind
    a TLS-inspecting proxy pip and apt need it), never copied into a layer.
    """
    check_host()
    build_base()
    build_pause()
    args = [
        "bud",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--pull-never",
        "--layers=false",
        "--build-arg",
        f"PYTHON_IMAGE={BASE_IMAGE}",
        "--tag",
        tag,
    ]
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        args += ["--volume", f"{bundle}:{bundle}:ro"]
    print(f"building {tag} from {context / 'Dockerfile'}", file=sys.stderr)
    _buildah(*args, str(context), capture=True)
    _buildah("rm", "--all")


def load(stack_dir: Path, names: tuple[str, ...] = (IMAGE, node.PAUSE_IMAGE)) -> None:
    """Copy the images from buildah's storage into the node's containerd (the kubelet's namespace)."""
    with tempfile.TemporaryDirectory(prefix="mljob-image-") as tmp:
        for name in names:
            archive = Path(tmp) / "image.tar"
            archive.unlink(missing_ok=True)
            _buildah("push", "--quiet", name, f"docker-archive:{archive}:{name}")
            node.ctr(stack_dir, "images", "import", str(archive), timeout=600)


def inspect(name: str = IMAGE) -> dict[str, object]:
    """buildah's view of an image: its OCI config (user, entrypoint, env) among the rest."""
    return dict(json.loads(_buildah("inspect", "--type", "image", name)))


def mount_read_only(name: str = IMAGE) -> tuple[str, Path]:
    """A working container of `name` and where its root filesystem is (for the image tests)."""
    container = _buildah("from", "--pull-never", name).strip()
    return container, Path(_buildah("mount", container).strip())


def remove_container(container: str) -> None:
    _buildah("rm", container)
