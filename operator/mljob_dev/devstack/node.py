"""A node for the local stack (`mljob dev stack up --node`): containerd, a kubelet registered with
the stack's apiserver, a kube-controller-manager (Deployments, ReplicaSets, service accounts) and
a kube-scheduler, so the chart's pods run as a cluster would run them.

Why this shape: the stack's servers listen on loopback only, so the node's only address is
127.0.0.1 (the kubelet takes a loopback address only as its node name, `--hostname-override`)
and the chart's pods use the host's network (`hostNetwork=true`). Nothing else is faked: the
kubelet pulls nothing (the images are loaded into containerd by `mljob dev image build`),
authenticates as `system:node:127.0.0.1`, mounts the pods' Secrets and service-account tokens,
runs their probes and serves their logs to the apiserver.

Needs root (containerd, runc, cgroups) and Debian's containerd, runc and containernetworking-plugins.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path

from mljob_dev.devstack import certs as certgen
from mljob_dev.devstack import tools
from mljob_dev.devstack.stack import Stack, StackError, _http_get, free_port

#: The pod sandbox image `mljob dev image build` makes from Kubernetes' own pause.c.
PAUSE_IMAGE = "localhost/mljob-pause:" + tools.KUBERNETES_VERSION
#: containerd's namespace for the kubelet's images and containers (the CRI's).
CRI_NAMESPACE = "k8s.io"
#: What the node needs from Debian, by the command each package provides.
DEBIAN_PACKAGES = {
    "containerd": "containerd",
    "runc": "runc",
    "ctr": "containerd",
    "/usr/lib/cni/loopback": "containernetworking-plugins",
}
#: The process names the stack's state file keeps, in start order (stopped in reverse).
PROCESSES = ("containerd", "kubelet", "kube-controller-manager", "kube-scheduler")


def missing_packages() -> list[str]:
    """Debian packages the node needs that this machine lacks."""
    missing = []
    for command, package in DEBIAN_PACKAGES.items():
        found = Path(command).exists() if command.startswith("/") else shutil.which(command)
        if not found and package not in missing:
            missing.append(package)
    return missing


def check_host() -> None:
    """Refuse early, with what to do, where a node cannot run."""
    if os.geteuid() != 0:
        raise StackError(
            "the node (containerd, kubelet) runs as root: run `mljob dev stack up --node` as root"
        )
    missing = missing_packages()
    if missing:
        raise StackError(f"the node needs Debian packages: apt-get install {' '.join(missing)}")


def containerd_socket(stack_dir: Path) -> Path:
    return stack_dir / "node" / "containerd" / "containerd.sock"


def ctr(
    stack_dir: Path, *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`ctr` against the stack's containerd, in the kubelet's namespace."""
    cmd = ["ctr", "--address", str(containerd_socket(stack_dir)), "--namespace", CRI_NAMESPACE, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise StackError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def _containerd_config(root: Path) -> str:
    """containerd 1.6's CRI: runc with cgroupfs (no systemd here), CNI from Debian's plugins
    with a loopback-only network (every pod of ours is on the host's network). Pods' OOM scores
    are kept at or above containerd's own (`restrict_oom_score_adj`): the kubelet asks -998 for
    the sandbox, which a host without CAP_SYS_RESOURCE (a container, this machine) refuses, and
    runc then fails the sandbox with "can't get final child's PID from pipe"."""
    return f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
[grpc]
  address = "{root / "containerd.sock"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{root / "cni"}"
"""


def _kubelet_config(stack: Stack, pki: certgen.ClusterCerts, socket: Path) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": certgen.NODE_NAME,
        "port": free_port(),
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": free_port(),
        "tlsCertFile": str(pki.kubelet_serving_cert),
        "tlsPrivateKeyFile": str(pki.kubelet_serving_key),
        # The apiserver's calls (logs, exec) are authenticated by its client cert and
        # authorized by a SubjectAccessReview, as on a cluster's node.
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki.ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{socket}",
        "cgroupDriver": "cgroupfs",
        # This machine has cgroup v1; kubelet 1.35 refuses it unless told to run anyway.
        "failCgroupV1": False,
        "failSwapOn": False,
        "resolvConf": "/etc/resolv.conf",
        "podLogsDir": str(stack.directory / "node" / "logs"),
        # The loaded images are the only copies: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "serializeImagePulls": False,
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "shutdownGracePeriod": "0s",
    }


def _write_kubeconfig(path: Path, server: str, pki: certgen.ClusterCerts, cert: Path, key: Path) -> None:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "local",
                        "cluster": {"server": server, "certificate-authority": str(pki.ca_cert)},
                    }
                ],
                "users": [
                    {"name": "node", "user": {"client-certificate": str(cert), "client-key": str(key)}}
                ],
                "contexts": [{"name": "local", "context": {"cluster": "local", "user": "node"}}],
                "current-context": "local",
            }
        )
    )
    path.chmod(0o600)


def _admin_context(pki: certgen.ClusterCerts) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return context


def _node_ready(server: str, context: ssl.SSLContext) -> bool:
    node = json.loads(_http_get(f"{server}/api/v1/nodes/{certgen.NODE_NAME}", context))
    conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
    return conditions.get("Ready") == "True"


def _healthz(port: int) -> bool:
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    return _http_get(f"https://127.0.0.1:{port}/healthz", unverified) == b"ok"


def start(stack: Stack) -> None:
    """Start containerd, the kubelet, the controller manager and the scheduler; return once the
    Node is Ready. The stack's apiserver must have been started with `node=True`."""
    check_host()
    binaries = tools.ensure_node()
    root = stack.directory / "node"
    pki = certgen.ClusterCerts.at(stack.directory / "pki")
    server = stack.env["MLJOB_KUBE_SERVER"]
    for sub in ("containerd/cni", "kubelet", "logs"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    cd_root = root / "containerd"
    (cd_root / "config.toml").write_text(_containerd_config(cd_root))
    (cd_root / "cni" / "10-loopback.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "mljob-loopback", "plugins": [{"type": "loopback"}]})
    )
    socket = containerd_socket(stack.directory)
    stack.spawn("containerd", ["containerd", "--config", str(cd_root / "config.toml")])
    stack.wait_ready("containerd", lambda: ctr(stack.directory, "version", timeout=5).returncode == 0)

    kubelet_kubeconfig = root / "kubelet.kubeconfig"
    _write_kubeconfig(kubelet_kubeconfig, server, pki, pki.node_cert, pki.node_key)
    config = _kubelet_config(stack, pki, socket)
    (root / "kubelet.yaml").write_text(json.dumps(config, indent=2))
    stack.spawn(
        "kubelet",
        [
            str(binaries["kubelet"]),
            f"--config={root / 'kubelet.yaml'}",
            f"--kubeconfig={kubelet_kubeconfig}",
            f"--root-dir={root / 'kubelet'}",
            f"--hostname-override={certgen.NODE_NAME}",
            "--v=1",
        ],
    )
    port = free_port()
    stack.spawn(
        "kube-controller-manager",
        [
            str(binaries["kube-controller-manager"]),
            f"--kubeconfig={stack.env['KUBECONFIG']}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            "--leader-elect=false",
            f"--root-ca-file={pki.ca_cert}",
            f"--service-account-private-key-file={pki.sa_private_key}",
            "--cluster-name=mljob-local",
            "--v=1",
        ],
    )
    stack.wait_ready("kube-controller-manager", lambda: _healthz(port))
    port = free_port()
    stack.spawn(
        "kube-scheduler",
        [
            str(binaries["kube-scheduler"]),
            f"--kubeconfig={stack.env['KUBECONFIG']}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            "--leader-elect=false",
            "--v=1",
        ],
    )
    stack.wait_ready("kube-scheduler", lambda: _healthz(port))
    context = _admin_context(pki)
    stack.wait_ready("kubelet", lambda: _node_ready(server, context), 180)
    stack.env["MLJOB_NODE_NAME"] = certgen.NODE_NAME
    stack.env["MLJOB_CONTAINERD_ADDRESS"] = str(socket)
    stack.save()


def stop_containers(stack_dir: Path) -> None:
    """Kill every container of the node (containerd's shims outlive containerd) and unmount
    what the kubelet and containerd mounted under the stack directory, so it can be removed."""
    if containerd_socket(stack_dir).exists():
        listed = ctr(stack_dir, "tasks", "ls", "-q", check=False, timeout=30)
        for task in listed.stdout.split():
            ctr(stack_dir, "tasks", "kill", "--signal", "SIGKILL", task, check=False, timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not ctr(stack_dir, "tasks", "ls", "-q", check=False, timeout=30).stdout.split():
                break
            time.sleep(0.3)
    for shim in _shims(stack_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(shim, 9)
    unmount_under(stack_dir)


def _shims(stack_dir: Path) -> list[int]:
    socket = str(containerd_socket(stack_dir))
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"containerd-shim-runc-v2") and socket.encode() in cmdline:
            found.append(int(proc.name))
    return found


def unmount_under(directory: Path) -> None:
    """Unmount (lazily, deepest first) every mount point below `directory`."""
    prefix = str(directory.resolve()) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
