"""The end of `make demo`: the job page of the read-only API (`mljob api`), checked as the
viewer the demo set up, and what to try next.

`wait URL`: until the API's /readyz answers (bounded). `check`: the job page, asked for with the
viewer's token in the pages' cookie (as a browser sends it after the login), must answer 200 and
show the Postgres counts the JSON summary gives the same token; then the address and the
commands to try are printed. The token is read from a file and never printed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COOKIE = "mljob_token"  # mljob.httpapi.auth.COOKIE (the demo tools import no operator module)


def page_url(base: str, namespace: str, name: str) -> str:
    return f"{base}/ui/namespaces/{namespace}/mljobs/{name}"


def page_counts(html: str) -> dict[str, int]:
    """The counts cells of a job page (`id="count-<store>-<what>"`), by `<store>-<what>`."""
    return {
        key: int(value.replace(",", ""))
        for key, value in re.findall(r'id="count-([a-z]+-[a-z]+)">([0-9,]+)<', html)
    }


def try_lines(
    url: str, namespace: str, name: str, token_file: str, kubeconfig: str, venv_bin: str, api: str
) -> list[str]:
    """What the demo prints at its end: the page, its login, and the commands to try."""
    return [
        f"    open       {url}",
        f"    log in     with the token in {token_file} (kubectl create token demo-viewer: get and list",
        f"               on MLJobs in {namespace}); the page keeps it in an HttpOnly cookie",
        "    or, in another shell (kubectl mljob is the kubectl plugin of the client):",
        f"      export KUBECONFIG={kubeconfig} PATH={venv_bin}:$PATH",
        f'      export MLJOB_API_URL={api} MLJOB_API_TOKEN="$(cat {token_file})"',
        f"      kubectl mljob status {name}",
        f"      kubectl mljob items {name} --failed",
        f"      kubectl mljob results {name} -o csv --output results.csv",
    ]


def _get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return int(reply.status), reply.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


def wait_ready(base: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if _get(base + "/readyz", {})[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def check(base: str, namespace: str, name: str, token: str) -> list[str]:
    """The job page as the viewer sees it; raises SystemExit when it does not answer as it should."""
    url = page_url(base, namespace, name)
    status, body = _get(url, {"Cookie": f"{COOKIE}={token}"})
    if status != 200:
        raise SystemExit(f"the job page {url} answered {status}: {body[:300].decode(errors='replace')}")
    html = body.decode()
    summary_status, raw = _get(
        f"{base}/api/v1/namespaces/{namespace}/mljobs/{name}", {"Authorization": f"Bearer {token}"}
    )
    summary: dict[str, Any] = json.loads(raw) if summary_status == 200 else {}
    outcomes = (summary.get("postgres") or {}).get("outcomes") or {}
    counts = page_counts(html)
    shown = {what: counts.get(f"postgres-{what}") for what in ("succeeded", "failed", "pending")}
    if summary_status != 200 or shown != {k: outcomes.get(k) for k in shown}:
        raise SystemExit(f"the job page shows {shown}, the API's summary {outcomes} ({summary_status})")
    who = re.search(r"signed in as <strong>([^<]+)</strong>", html)
    return [
        f"    the job page answers 200 as {who.group(1) if who else '?'}: {shown['succeeded']:,} succeeded, "
        f"{shown['failed']:,} failed, as in Postgres"
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mljob_dev.demo.pages", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait", help="until the API at URL is ready")
    wait.add_argument("url")
    wait.add_argument("--seconds", type=float, default=120)
    chk = sub.add_parser("check", help="check the job page and print what to try")
    chk.add_argument("--url", required=True, help="the API's base URL")
    chk.add_argument("--namespace", required=True)
    chk.add_argument("--name", required=True)
    chk.add_argument("--token-file", type=Path, required=True)
    chk.add_argument("--kubeconfig", required=True)
    chk.add_argument("--venv-bin", required=True)
    args = parser.parse_args(argv)
    if args.command == "wait":
        if wait_ready(args.url, args.seconds):
            return 0
        print(f"mljob api at {args.url} was not ready within {args.seconds:g}s", file=sys.stderr)
        return 1
    token = args.token_file.read_text().strip()
    lines = check(args.url, args.namespace, args.name, token)
    lines += try_lines(
        page_url(args.url, args.namespace, args.name),
        args.namespace,
        args.name,
        str(args.token_file),
        args.kubeconfig,
        args.venv_bin,
        args.url,
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
