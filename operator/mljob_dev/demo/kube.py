"""A kubeconfig for `make demo`'s operator that authenticates with a ServiceAccount token only.

The demo runs the operator as the chart's ServiceAccount (its RBAC, not the admin's
`system:masters` certificate), so the kubeconfig keeps the admin's cluster (server and CA) and
replaces every user by one holding just the token.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

USER = "mljob-operator"


def token_kubeconfig(config: dict[str, Any], token: str, user: str = USER) -> dict[str, Any]:
    """`config` with one user, `user`, holding `token`, and every context pointing at it."""
    out = copy.deepcopy(config)
    out["users"] = [{"name": user, "user": {"token": token}}]
    for context in out.get("contexts", []):
        context.setdefault("context", {})["user"] = user
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mljob_dev.demo.kube ADMIN_KUBECONFIG OUT < token`: write the token kubeconfig."""
    parser = argparse.ArgumentParser(prog="python -m mljob_dev.demo.kube", description=__doc__)
    parser.add_argument("admin", type=Path, help="a kubeconfig for the cluster (JSON or YAML)")
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    token = sys.stdin.read().strip()
    if not token:
        parser.error("no token on stdin")
    import yaml

    config = yaml.safe_load(args.admin.read_text())
    args.out.write_text(json.dumps(token_kubeconfig(config, token)))
    args.out.chmod(0o600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
