# Loom: two commands do all the set-up. `make run` serves the embedded default;
# `make test` runs the whole suite. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
# Packages mypy checks (config: pyproject.toml [tool.mypy]): all of them.
TYPED := models training serving deploy benchmarks loom

.PHONY: install run test lint grpc-gen bench bench-quick clean

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

# The v2 gRPC code committed beside serving/gateway/protocols/grpc_predict_v2*.proto, made again
# from them with grpcio-tools' protoc (a unit test checks the committed code is what this makes).
grpc-gen: $(STAMP)
	$(BIN)/python -m serving.gateway.protocols.grpc_codegen

# Benchmarks: `make bench` runs them all (`loom bench all`), `make bench-quick` the smoke run,
# `make bench-embeddings` (or any other benchmark's name) one of them. Each writes a run folder
# under benchmarks/results/ (result.json, report.md, plots); see docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/loom bench all

bench-quick: $(STAMP)
	$(BIN)/loom bench all --quick

bench-%: $(STAMP)
	$(BIN)/loom bench $*

clean:
	rm -rf $(VENV) build *.egg-info
