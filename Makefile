# Loom: two commands do all the set-up. `make run` serves the embedded default;
# `make test` runs the whole suite. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
# Packages mypy checks (config: pyproject.toml [tool.mypy]): all of them.
TYPED := models training serving deploy loom

.PHONY: install run test lint bench bench-generation bench-training bench-ensemble bench-sharding bench-faults bench-autoscaling clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/loom serve

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy $(TYPED)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy $(TYPED)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.embeddings

bench-generation: $(STAMP)
	$(BIN)/python -m benchmarks.generation

bench-training: $(STAMP)
	$(BIN)/python -m benchmarks.training

bench-ensemble: $(STAMP)
	$(BIN)/python -m benchmarks.ensemble

bench-sharding: $(STAMP)
	$(BIN)/python -m benchmarks.sharding

bench-faults: $(STAMP)
	$(BIN)/python -m benchmarks.faults

bench-autoscaling: $(STAMP)
	$(BIN)/python -m benchmarks.autoscaling

clean:
	rm -rf $(VENV) build *.egg-info
