# The two commands of a fresh machine are `sudo make demo` and `sudo make test`; both run `make setup`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint demo bench bench-quick proto clean

setup:
	@bash scripts/setup.sh

lint: setup
	@$(VENV)/bin/ruff check nodeagent tests bench
	@$(VENV)/bin/ruff format --check nodeagent tests bench
	@$(VENV)/bin/mypy nodeagent
	@$(VENV)/bin/lint-imports --no-cache

test: setup
	@bash scripts/test.sh

demo: setup
	@$(VENV)/bin/nodeagent demo

bench: setup
	@$(PY) -m bench.run --full

bench-quick: setup
	@$(PY) -m bench.run --quick

# Regenerate the protobuf/gRPC modules from nodeagent/**/*.proto (committed, so users need no protoc).
proto:
	@$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
include vagrant/vagrant.mk
