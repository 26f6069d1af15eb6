# Two commands do everything on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: help deps venv tools lint typecheck unit test test-node test-ha demo bench stack-up stack-down crd clean

help:
	@echo "make test   - install what is missing, start the local stack, run ruff, mypy and every test"
	@echo "make test-node - as root: the image built from the Dockerfile and the chart's pods on a local node"
	@echo "make test-ha - faults on the clustered stack (3 NATS nodes, a Redis Cluster, Postgres failover)"
	@echo "make unit   - pure unit tests only (no services)"
	@echo "make demo   - run the demo job on a local stack"
	@echo "make crd    - re-render crds/ and the chart's CRD from the models"

deps:
	@scripts/install-deps

$(BIN)/mljob: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[operator,devstack,dev,notebook,browser]'
	@touch $@

venv: $(BIN)/mljob

tools: deps venv
	$(BIN)/mljob dev tools

lint: venv
	$(BIN)/ruff check operator tests bench
	$(BIN)/ruff format --check operator tests bench
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -m unit -q

test: deps venv lint typecheck tools
	@scripts/install-deps --browser
	@scripts/run-tests -m "not node and not ha"

# The node's tests (tests/node): as root, with containerd, a kubelet and buildah; CI runs them after `make test`.
test-node: venv
	@scripts/install-deps --node
	@scripts/run-node-tests

# The clustered stack's fault tests (tests/ha): a clustered stack of their own; CI runs them after test-node.
test-ha: deps venv tools
	@scripts/install-deps --ha
	@scripts/run-ha-tests

crd: venv
	$(BIN)/mljob crd

demo: deps venv tools
	@scripts/demo

# Baselines (later mljob too) on one local stack, one markdown table each; e.g. BENCH_ARGS="--items 2000".
bench: deps venv tools
	@$(BIN)/python -c 'import celery, psutil' 2>/dev/null && test -x $(BIN)/py-spy || $(BIN)/pip install -q -e '.[operator,devstack,dev,bench]'
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

stack-up: deps venv tools
	$(BIN)/mljob dev stack up

stack-down: venv
	$(BIN)/mljob dev stack down

clean:
	rm -rf $(VENV) .stack .pytest_cache .mypy_cache .ruff_cache
