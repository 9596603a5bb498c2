# coinstore: `make run` starts everything on the embedded defaults; `make test` runs the tests.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto' | sort)
GEN := gen

.PHONY: help venv proto proto-check lint fmt test run demo soak docs bench clean

help: ## List the targets
	@grep -E '^[a-z][a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP) ## Create .venv and install coinstore with its dev tools

proto: $(STAMP) ## Generate Python code and type stubs from proto/ into gen/
	rm -rf $(GEN)/coinstore
	mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iproto -I$$($(PY) -c 'import grpc_tools,os;print(os.path.join(grpc_tools.__path__[0],"_proto"))') \
		--python_out=$(GEN) --grpc_python_out=$(GEN) \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=$(GEN) \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(GEN) \
		$(PROTOS)
	find $(GEN)/coinstore -type d -exec touch {}/__init__.py \;
	touch $(GEN)/coinstore/py.typed

proto-check: $(STAMP) ## Fail if the protos break buf lint or gen/ is stale
	cd proto && ../$(BIN)/buf lint
	$(MAKE) --no-print-directory proto
	@git diff --exit-code --stat -- $(GEN) && test -z "$$(git status --porcelain -- $(GEN))" \
		|| { echo "gen/ is stale: run 'make proto' and commit the result"; exit 1; }

lint: $(STAMP) ## ruff, ruff format --check and mypy
	$(BIN)/ruff check services tests
	$(BIN)/ruff format --check services tests
	$(BIN)/mypy

fmt: $(STAMP) ## Format and autofix with ruff
	$(BIN)/ruff format services tests
	$(BIN)/ruff check --fix services tests

# Tests mostly wait on sockets, processes and databases, so they run in parallel
# processes (pytest-xdist); every test has its own database, queues and ports.
TEST_WORKERS ?= 4

test: $(STAMP) ## Run the whole test suite (TEST_WORKERS=4 processes in parallel)
	$(BIN)/pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

run: proto ## Run every service, a Celery worker and the store simulator (Ctrl-C stops all)
	$(BIN)/coinstore dev run

demo: $(STAMP) ## With `make run` up: buy, verify, gift, refund, cash out and pay a batch, step by step
	$(BIN)/coinstore demo

# The system scenarios for DURATION on one system (PostgreSQL + BROKER); SEED replays a run.
SEED ?= 0
DURATION ?= 30m
BROKER ?= redis
soak: $(STAMP) ## Long system run: make soak [SEED=n] [DURATION=30m] [BROKER=redis|rabbitmq]; prints what it proved
	PYTHONPATH=.:gen $(PY) -m tests.system.soak --seed $(SEED) --duration $(DURATION) --broker $(BROKER)

docs: $(STAMP) ## Regenerate the README's configuration table from the settings classes
	$(BIN)/coinstore config --readme README.md

# `make bench wallet apple` names benchmarks as extra goals; BASELINE=<git ref> also measures that commit.
ifeq (bench,$(firstword $(MAKECMDGOALS)))
  BENCH_GOALS := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
  $(eval $(BENCH_GOALS):;@:)
endif

bench: $(STAMP) ## Run the benchmarks: make bench [BASELINE=<ref>] [wallet apple …] [BENCH_ARGS=--quick]
	$(PY) -m tests.bench $(if $(BASELINE),--baseline $(BASELINE)) $(BENCH_GOALS) $(BENCH_ARGS)

clean: ## Remove the virtual environment, run state and caches
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
