# The two set-up commands of README.md: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: setup demo test lint bench

setup:
	./scripts/setup.sh

demo: setup
	$(PYTHON) -m ketanode demo

# Two workers, one test file each (module fixtures stay in one process): the imaging steps
# run one ITK thread each (for repeatable results), so two files use both cores.
test: setup
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

lint:
	ruff check ketanode tests bench migrations
	ruff format --check ketanode tests bench migrations
	mypy --strict ketanode

bench:
	$(PYTHON) bench/ingest.py
	$(PYTHON) bench/completion.py
