"""The image built from the Dockerfile (buildah, no Docker engine): what a platform engineer's
first `helm install` runs. Its config (entrypoint, user), its files (nothing writable but /tmp,
no compilers), and the image run by the node's containerd as the chart runs it: uid 10001, a
read-only root with a tmpfs at /tmp, and a worker process that stays light."""

from __future__ import annotations

import json
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mljob_dev.devstack import image, node
from mljob_dev.devstack import stack as devstack
from support.probe import write_probe

pytestmark = pytest.mark.node

UID = GID = 10001
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "make", "as", "ld", "x86_64-linux-gnu-gcc-12")


@pytest.fixture(scope="module")
def rootfs(built_image: str) -> Iterator[Path]:
    container, path = image.mount_read_only(built_image)
    try:
        yield path
    finally:
        image.remove_container(container)


def run_in_containerd(stack_dir: Path, *cmd: str) -> tuple[int, str]:
    """The image in the node's containerd as the chart runs it: its own user, a read-only root,
    a tmpfs at /tmp."""
    proc = node.ctr(
        stack_dir,
        "run",
        "--rm",
        "--read-only",
        "--mount",
        "type=tmpfs,src=tmpfs,dst=/tmp,options=rw:nosuid:nodev",
        image.IMAGE,
        f"check-{uuid.uuid4().hex[:8]}",
        *cmd,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_the_entrypoint_is_mljob_and_the_user_is_10001(built_image: str) -> None:
    config: dict[str, Any] = image.inspect(built_image)["OCIv1"]["config"]  # type: ignore[index]
    assert config["Entrypoint"] == ["mljob"]
    assert config["Cmd"] == ["operator"]
    assert config["User"] == f"{UID}:{GID}"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOME"] == env["TMPDIR"] == "/tmp"


def _writable_by_the_user(mode: int, uid: int, gid: int) -> bool:
    return bool(
        (uid == UID and mode & stat.S_IWUSR) or (gid == GID and mode & stat.S_IWGRP) or mode & stat.S_IWOTH
    )


def test_nothing_but_tmp_is_writable_by_its_user(rootfs: Path) -> None:
    writable = []
    for path in [rootfs, *rootfs.rglob("*")]:
        info = path.lstat()
        if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            continue  # links, and the device nodes a runtime replaces with its own /dev
        if _writable_by_the_user(info.st_mode, info.st_uid, info.st_gid):
            writable.append("/" + str(path.relative_to(rootfs)).removeprefix("."))
    assert writable == ["/tmp"]
    assert (rootfs / "var/tmp").is_symlink() and (rootfs / "var/tmp").readlink() == Path("/tmp")


def test_no_compiler_is_in_the_image(rootfs: Path) -> None:
    found = [
        f"{where}/{name}"
        for where in ("usr/bin", "usr/local/bin", "bin", "opt/mljob/bin")
        for name in COMPILERS
        if (rootfs / where / name).exists()
    ]
    assert found == []
    assert not list((rootfs / "usr/lib").glob("gcc/*/*/cc1")), "the C compiler proper"
    # The venv came from wheels alone, and pip left with the build.
    assert not (rootfs / "opt/mljob/bin/pip").exists()
    assert (rootfs / "opt/mljob/bin/mljob").exists()


def test_the_image_runs_read_only_as_10001_in_containerd(
    node_stack: devstack.Stack, built_image: str
) -> None:
    code, out = run_in_containerd(
        node_stack.directory,
        "python",
        "-c",
        write_probe({"root": "/x", "opt": "/opt/mljob/x", "var_tmp": "/var/tmp/x", "tmp": "/tmp/x"}),
    )
    assert code == 0, out
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {
        "uid": UID,
        "gid": GID,
        "root": "Read-only file system",
        "opt": "Read-only file system",
        "var_tmp": "wrote",  # /var/tmp leads to /tmp
        "tmp": "wrote",
    }
    code, out = run_in_containerd(node_stack.directory, "mljob", "--help")
    assert code == 0 and "operator" in out and "worker" in out, out


def test_a_worker_in_the_image_loads_only_the_worker_sdk(
    node_stack: devstack.Stack, built_image: str
) -> None:
    """The image carries the operator's dependencies too; a worker process must not load them
    (a worker image built FROM this one stays as light as `pip install mljob-operator`)."""
    code, out = run_in_containerd(
        node_stack.directory,
        "python",
        "-c",
        "import sys, mljob.cli.worker, mljob.worker.runner, mljob.worker.examples\n"
        "heavy = {'kopf', 'kubernetes', 'redis', 'psycopg', 'yaml', 'prometheus_client'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))",
    )
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "[]"
