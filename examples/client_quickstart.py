"""mljob.client from Python, as in a notebook: submit a job of items, wait with a progress bar,
look at the failed items and the results, retry the failures.

On the local stack (README, "Inspecting jobs"), with `mljob api` running and a worker serving the
pipeline:

    eval "$(.venv/bin/mljob dev stack env)"
    export MLJOB_API_URL=http://localhost:8080 MLJOB_API_TOKEN=$(kubectl create token ml-engineer)
    .venv/bin/python examples/client_quickstart.py --pipeline thumbnails --items 200

Kubernetes is reached with the kubeconfig's credentials (KUBECONFIG), the read-only API at
MLJOB_API_URL with MLJOB_API_TOKEN (or the kubeconfig user's token). pandas makes the tables
DataFrames and tqdm draws the bar (`pip install 'mljob-operator[notebook]'`); without them the
same calls give lists and a plain line.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections import Counter

from mljob.client import Client, ClientError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="thumbnails")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--namespace", help="default: the kubeconfig context's")
    args = parser.parse_args()

    mlj = Client(args.namespace)
    name = f"quickstart-{secrets.token_hex(3)}"
    items = [
        {"id": f"img-{n:04d}", "url": f"https://images.invalid/img-{n:04d}.jpg"} for n in range(args.items)
    ]
    try:
        mlj.submit(name, pipeline=args.pipeline, items=items, params={"size": 128})
        print(f"submitted {name}: {len(items)} items to pipeline {args.pipeline}")
        status = mlj.wait(name, timeout=600)
        print(f"{name} {status['phase']}: {status['processed']} processed, {status['failed']} failed")

        failed = list(mlj.failed(name))  # or mlj.items_frame(name, outcome="failed"), a DataFrame
        print(f"{len(failed)} failed items, by reason: {dict(Counter(i['reason'] for i in failed))}")
        for item in failed[:3]:
            print(f"  {item['id']}: {item['error']} (attempts {item['attempts']}, worker {item['worker']})")

        ok = sum(1 for row in mlj.results(name) if row["outcome"] == "succeeded")  # streamed
        print(f"{ok} results succeeded; first: {next(mlj.results(name))['result']}")
        try:
            print(mlj.results_frame(name).head())  # pandas, where installed
        except ClientError as err:  # MissingExtra: the notebook extra is not installed
            print(err)

        if failed:
            retried = mlj.retry(name)  # a new MLJob of the failed items, linked to this one
            print(f"retried as {retried}")
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        mlj.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
