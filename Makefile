# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= dev,eval,flower
SHARED ?= $(abspath ../shared)
export GRADGUARD_SHARED ?= $(SHARED)

.PHONY: venv test demo bench bench-step bench-shadow bench-transport bench-quick proto clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m gradguard.cli demo --out gradguard-report

bench-step: $(STAMP)
	$(PY) benchmarks/step_overhead.py

bench-shadow: $(STAMP)
	$(PY) benchmarks/shadow_vs_attack.py

bench-transport: $(STAMP)
	$(PY) benchmarks/transport.py

bench-quick: $(STAMP)
	$(PY) -m gradguard.cli bench --quick --out bench-out/quick

bench: bench-step bench-shadow bench-transport

# Regenerates gradguard/transport/_generated from protos/ (needs grpcio-tools, see README).
proto:
	$(PY) -m pip install --quiet "grpcio-tools>=1.66,<1.72"
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gradguard/transport/_generated \
	  --grpc_python_out=gradguard/transport/_generated --pyi_out=gradguard/transport/_generated \
	  protos/gradguard/v1/*.proto

clean:
	rm -rf $(VENV) build *.egg-info
