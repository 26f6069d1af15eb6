"""`mljob dev` (the local stack, the Go-built tools) and `mljob chaos`, added to `mljob` when
this package is importable: in a source checkout, never in the wheel or the image."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

POINTER = Path(".stack") / "dir"


def _stack_dir(args: argparse.Namespace) -> Path:
    if args.dir:
        return Path(args.dir)
    if os.environ.get("MLJOB_STACK_DIR"):
        return Path(os.environ["MLJOB_STACK_DIR"])
    if POINTER.exists():
        return Path(POINTER.read_text().strip())
    raise SystemExit("no running stack found: run `mljob dev stack up` first")


def _cmd_stack(args: argparse.Namespace) -> int:
    from mljob_dev.devstack import stack as devstack
    from mljob_dev.devstack.tools import ToolError

    if args.action == "up":
        try:
            running = devstack.up(Path(args.dir) if args.dir else None, node=args.node, ha=args.ha)
        except (devstack.StackError, ToolError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        POINTER.parent.mkdir(exist_ok=True)
        POINTER.write_text(str(running.directory))
        print(running.export_lines())
        return 0
    directory = _stack_dir(args)
    if args.action == "restart":
        from mljob_dev.devstack.restart import SERVICES, restart

        if args.service not in SERVICES:
            print(f"error: name the service to restart: {', '.join(SERVICES)}", file=sys.stderr)
            return 2
        try:
            restart(directory, args.service, args.down_seconds)
        except devstack.StackError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"restarted {args.service} in {directory}", file=sys.stderr)
        return 0
    if args.action == "env":
        print(devstack.Stack.load(directory).export_lines())
        return 0
    if args.action in ("kill", "start", "leaders"):
        return _cmd_cluster_node(directory, args.action, args.service)
    devstack.down(directory)
    if POINTER.exists() and POINTER.read_text().strip() == str(directory):
        POINTER.unlink()
    return 0


def _cmd_cluster_node(directory: Path, action: str, node: str | None) -> int:
    """`kill NODE`, `start NODE`, `leaders` on a clustered stack (devstack/cluster_nodes.py)."""
    import json

    from mljob_dev.devstack import cluster_nodes
    from mljob_dev.devstack.stack import Stack, StackError

    try:
        stack = Stack.load(directory)
        if action == "leaders":
            print(json.dumps(cluster_nodes.leaders(stack), indent=2))
            return 0
        if not node:
            print(f"error: name the node: {', '.join(cluster_nodes.names(stack))}", file=sys.stderr)
            return 2
        (cluster_nodes.kill if action == "kill" else cluster_nodes.start)(stack, node)
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{'killed' if action == 'kill' else 'started'} {node} in {directory}", file=sys.stderr)
    return 0


def _cmd_image(args: argparse.Namespace) -> int:
    from mljob_dev.devstack import image
    from mljob_dev.devstack.stack import StackError

    try:
        image.build()
        if args.load:
            image.load(_stack_dir(args))
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(image.IMAGE)
    return 0


def _cmd_tools(args: argparse.Namespace) -> int:
    from mljob_dev.devstack import tools

    names = args.names or [*tools.ensure_all(), *(tools.ensure_node() if args.node else ())]
    for name in names:
        print(tools.ensure(name))
    return 0


def add_parsers(sub: Any) -> None:
    """Register `dev` and `chaos` on the `mljob` command's sub-parsers."""
    dev = sub.add_parser("dev", help="local development helpers").add_subparsers(dest="dev", required=True)
    stack = dev.add_parser("stack", help="start/stop the local kube-apiserver, NATS, Redis, Postgres")
    stack.add_argument("action", choices=["up", "down", "env", "restart", "kill", "start", "leaders"])
    stack.add_argument(
        "service",
        nargs="?",
        help="restart: nats, redis or postgres; kill/start (a clustered stack's node, SIGKILL and "
        "back): nats-1..3, redis-cluster-1..6, patroni-1..2; leaders: who leads what",
    )
    stack.add_argument("--dir", help="stack directory (default: a new temporary directory)")
    stack.add_argument(
        "--down-seconds", type=float, default=0.0, help="restart only: stay down this long first"
    )
    stack.add_argument(
        "--node",
        action="store_true",
        help="up only: a node too (containerd, kubelet, controller manager, scheduler; as root)",
    )
    stack.add_argument(
        "--ha",
        action="store_true",
        help="up only: clustered servers (3 NATS nodes, a Redis Cluster, Postgres with failover)",
    )
    stack.set_defaults(func=_cmd_stack)
    image = dev.add_parser("image", help="build the Dockerfile's image without Docker (buildah; as root)")
    image.add_argument("action", choices=["build"])
    image.add_argument("--load", action="store_true", help="and load it into the running stack's node")
    image.add_argument("--dir", help="stack directory for --load (default: the running stack)")
    image.set_defaults(func=_cmd_image)
    tools_cmd = dev.add_parser("tools", help="build (once) and print the cached Go-built binaries")
    tools_cmd.add_argument("names", nargs="*")
    tools_cmd.add_argument(
        "--node", action="store_true", help="the node's too (kubelet, controller manager, scheduler)"
    )
    tools_cmd.set_defaults(func=_cmd_tools)

    try:
        from mljob_dev.chaos import add_parser as add_chaos_parser
    except ImportError:  # without the operator extra: `mljob` names the extra before parsing
        sub.add_parser("chaos", help="inject faults and inspect orphans (needs the operator extra)")
    else:
        add_chaos_parser(sub)
