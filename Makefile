# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= dev,eval,flower
SHARED ?= $(abspath ../shared)
export GRADGUARD_SHARED ?= $(SHARED)

.PHONY: venv test demo bench bench-step bench-shadow bench-transport bench-quick bench-paper bench-paper-seeds bench-mid-clients proto clean

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

# The full evaluation protocol (RESULTS.md) on CPU: one process per dataset, sharing the cache in
# bench-out/paper (a rerun resumes), then one report over both. BENCH_ARGS adds options, e.g.
# BENCH_ARGS="--large --device cuda" for the GPU size.
BENCH_ARGS ?=
bench-paper: $(STAMP)
	$(PY) -m gradguard.cli bench --full --no-progress $(BENCH_ARGS) --datasets pneumoniamnist --out bench-out/paper \
		--report-dir bench-out/paper/pneumoniamnist-only & \
	$(PY) -m gradguard.cli bench --full --no-progress $(BENCH_ARGS) --datasets retinamnist --out bench-out/paper \
		--report-dir bench-out/paper/retinamnist-only & \
	wait
	$(PY) -m gradguard.cli bench --full $(BENCH_ARGS) --out bench-out/paper --report-dir benchmarks/results/paper

# The settings that decide the goals over 20 seeds of utility and 3 attacked runs, in the same cache
# (benchmarks/results/paper-seeds/README.md); about an hour per dataset on a core beyond bench-paper.
P1  := gradguard:relevance_class=predicted,vulnerability_temperature=1.0
P1B := $(P1),batch_exponent=0.5
SEEDS_ARGS := --full --no-progress --seeds 20 --attack-seeds 3 --out bench-out/paper $(BENCH_ARGS)
bench-paper-seeds: $(STAMP)
	$(PY) -m gradguard.cli bench $(SEEDS_ARGS) --datasets pneumoniamnist \
		--report-dir benchmarks/results/paper-seeds/pneumoniamnist --defenses none \
		$(P1),update_exponent=0.5,noise_amplitude=0.9 untargeted:update_exponent=0.5,noise_amplitude=0.9 \
		$(P1B),noise_amplitude=0.6 $(P1B),noise_amplitude=0.7 $(P1B),noise_amplitude=0.9,amplitude_growth=-1.0 \
		$(P1) untargeted:batch_exponent=0.5,noise_amplitude=0.6 untargeted:noise_amplitude=0.5 \
		gaussian:sigma0=0.1 pruning:fraction=0.5 & \
	$(PY) -m gradguard.cli bench $(SEEDS_ARGS) --datasets retinamnist \
		--report-dir benchmarks/results/paper-seeds/retinamnist --defenses none \
		gradguard:mask_floor=0.7,update_exponent=0.5,noise_amplitude=1.0 untargeted:update_exponent=0.5,noise_amplitude=1.0 \
		gradguard:mask_floor=0.7,noise_amplitude=0.5 gradguard:mask_floor=0.7 gradguard \
		untargeted:noise_amplitude=0.5 untargeted:batch_exponent=0.5,noise_amplitude=0.6 \
		dpsgd:max_grad_norm=5,noise_multiplier=0.1 gaussian:sigma0=0.1 pruning:fraction=0.5 & \
	wait

# Session 8's check of the clients update_exponent leaves almost clean: clients 2 and 6 (16 images
# each, 4 and 2 local steps) attacked with and without the presets, seed 0.
MID_ARGS := --full --no-progress --seeds 1 --clients client2 client6 --out bench-out/mid-clients $(BENCH_ARGS)
bench-mid-clients: $(STAMP)
	$(PY) -m gradguard.cli bench $(MID_ARGS) --datasets pneumoniamnist \
		--report-dir benchmarks/results/mid-clients/pneumoniamnist --defenses none $(P1),update_exponent=0.5,noise_amplitude=0.9
	$(PY) -m gradguard.cli bench $(MID_ARGS) --datasets retinamnist \
		--report-dir benchmarks/results/mid-clients/retinamnist --defenses none \
		gradguard:mask_floor=0.7,update_exponent=0.5,noise_amplitude=1.0

bench: bench-step bench-shadow bench-transport

# Regenerates gradguard/transport/_generated/v1 from protos/gradguard/v1 (the generated code is
# committed; this target is only for changing the .proto). grpcio-tools lives in a throwaway venv:
# 1.70.0 bundles protoc 29 (protobuf 5.29 gencode), which runs on protobuf >=5.29,<7 and grpcio
# >=1.70 (what Flower allows); newer grpcio-tools need protobuf >= 6.30 or 7. The -I mapping makes
# the generated imports name the real package (gradguard.transport._generated.v1), so no
# post-processing is needed. SOURCE.sha256 lets a test catch a .proto edited without regenerating.
PROTOC_VENV := build/protoc-venv
GEN_DIR     := gradguard/transport/_generated/v1
proto:
	test -x $(PROTOC_VENV)/bin/python || $(PYTHON) -m venv $(PROTOC_VENV)
	$(PROTOC_VENV)/bin/python -m pip install --quiet "grpcio-tools==1.70.0"
	$(PROTOC_VENV)/bin/python -m grpc_tools.protoc -I$(GEN_DIR)=protos/gradguard/v1 \
	  --python_out=. --grpc_python_out=. --pyi_out=. protos/gradguard/v1/*.proto
	cd protos/gradguard/v1 && sha256sum *.proto > $(CURDIR)/$(GEN_DIR)/SOURCE.sha256

clean:
	rm -rf $(VENV) build *.egg-info
