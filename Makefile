# Two commands on a fresh machine: `make demo` runs the tiny job, `make test` runs the tests.
# Both create .venv in the repo root and install what they need (CPU torch 2.13.0, versions pinned in constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/moedisco demo

test: $(STAMP)
	bash scripts/run_tests.sh

clean:
	rm -rf runs $(VENV)
