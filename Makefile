# The two set-up commands of README.md: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: setup demo test lint bench

setup:
	./scripts/setup.sh

demo: setup
	$(PYTHON) -m ketanode demo

test: setup
	$(PYTHON) -m pytest -q

lint:
	ruff check ketanode tests bench migrations
	mypy ketanode

bench:
	$(PYTHON) bench/ingest.py
	$(PYTHON) bench/completion.py
