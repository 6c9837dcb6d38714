# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= dev,eval,flower
SHARED ?= $(abspath ../shared)
export GRADGUARD_SHARED ?= $(SHARED)

.PHONY: venv test demo bench bench-step bench-shadow bench-transport bench-quick bench-leakage bench-leakage-full bench-calibrated bench-calibrated-bn bench-calibrated-malicious bench-bound-tightness bench-calibration-cost bench-probe-mix bench-probe-mix-large bench-paper bench-paper-seeds bench-mid-clients proto clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check gradguard tests benchmarks
	$(PY) -m mypy gradguard
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

# BENCH_ARGS adds options to every benchmark below, e.g. BENCH_ARGS="--device cuda".
BENCH_ARGS ?=

# The leakage benchmark (RESULTS.md): leakage above the attacker's prior where undefended updates
# leak. One process per dataset, sharing the cache in bench-out/<name> (a rerun resumes), then one
# report over both in benchmarks/results/<name>.
define leakage
	$(PY) -m gradguard.cli bench --experiment benchmarks/experiments/$(1).toml --no-progress $(BENCH_ARGS) \
		--datasets pneumoniamnist --out bench-out/$(1) --report-dir bench-out/$(1)/pneumoniamnist-only & \
	$(PY) -m gradguard.cli bench --experiment benchmarks/experiments/$(1).toml --no-progress $(BENCH_ARGS) \
		--datasets retinamnist --out bench-out/$(1) --report-dir bench-out/$(1)/retinamnist-only & \
	wait
	$(PY) -m gradguard.cli bench --experiment benchmarks/experiments/$(1).toml --no-progress $(BENCH_ARGS) \
		--out bench-out/$(1) --report-dir benchmarks/results/$(1)
endef
bench-leakage: $(STAMP)
	$(call leakage,leakage)
bench-leakage-full: $(STAMP)
	$(call leakage,leakage-full)

# One federation experiment per dataset side by side, sharing the cache of bench-out/calibrated:
# $(call calibrated,EXPERIMENT) reports to benchmarks/results/EXPERIMENT/<dataset>.
calibrated = $(foreach ds,pneumoniamnist retinamnist,$(PY) -m gradguard.cli bench \
	--experiment benchmarks/experiments/$(1).toml --no-progress $(BENCH_ARGS) --datasets $(ds) \
	--out bench-out/calibrated --report-dir benchmarks/results/$(1)/$(ds) &) wait

# The calibrated default's utility over the federation benchmark's protocol (5 seeds per dataset,
# benchmarks/results/calibrated/<dataset>), which the leakage benchmark reads: run it first.
bench-calibrated: $(STAMP)
	$(call calibrated,calibrated)

# Where the calibrated default's BatchNorm statistics come from (benchmarks/results/calibrated-bn).
bench-calibrated-bn: $(STAMP)
	$(call calibrated,calibrated-bn)

# The malicious-server threat's utility at leakage targets of 1 (the default), 3, 6 and 10 dB
# (benchmarks/results/calibrated-malicious), then what the benchmark's attacker recovers at each
# (benchmarks/results/leakage-malicious, the imprint settings of the leakage benchmark).
bench-calibrated-malicious: $(STAMP)
	$(call calibrated,calibrated-malicious)
	$(PY) -m gradguard.cli bench --experiment benchmarks/experiments/leakage-malicious.toml --no-progress \
		$(BENCH_ARGS) --out bench-out/leakage --report-dir benchmarks/results/leakage-malicious

bench-bound-tightness: $(STAMP)
	$(PY) benchmarks/bound_tightness.py
	$(PY) benchmarks/bound_tightness.py --target-db 3 --calibrated-only --name bound_tightness_3db
	$(PY) benchmarks/bound_tightness.py --target-db 6 --calibrated-only --name bound_tightness_6db

bench-calibration-cost: $(STAMP)
	$(PY) benchmarks/calibration_cost.py

# How many of a large client's images the probe mixes into a delta's stand-in (RESULTS.md).
bench-probe-mix: $(STAMP)
	$(PY) benchmarks/probe_mix.py --mixes 8,16,32 --draws 3 --trained 0,200

# The probe's worst image against its null up to the whole 256-image client, every attack in full (about 41 min).
bench-probe-mix-large: $(STAMP)
	$(PY) benchmarks/probe_mix.py --mixes 16,64,256 --draws 2 --trained 0,200 --null --full --name probe_mix_large

# The federation benchmark's full report (benchmarks/experiments/paper.toml) on CPU: one process per
# dataset sharing the cache in bench-out/paper (a rerun resumes), then one report over both.
bench-paper: $(STAMP)
	$(PY) -m gradguard.cli bench --experiment benchmarks/experiments/paper.toml --no-progress $(BENCH_ARGS) \
		--datasets pneumoniamnist --out bench-out/paper --report-dir bench-out/paper/pneumoniamnist-only & \
	$(PY) -m gradguard.cli bench --experiment benchmarks/experiments/paper.toml --no-progress $(BENCH_ARGS) \
		--datasets retinamnist --out bench-out/paper --report-dir bench-out/paper/retinamnist-only & \
	wait
	$(PY) -m gradguard.cli bench --experiment benchmarks/experiments/paper.toml $(BENCH_ARGS) --out bench-out/paper \
		--report-dir benchmarks/results/paper

# The settings that decided the modality presets over 20 seeds of utility and 3 attacked runs, in
# the same cache (benchmarks/results/paper-seeds/README.md).
bench-paper-seeds: $(STAMP)
	$(PY) -m gradguard.cli bench --experiment benchmarks/experiments/paper-seeds-pneumoniamnist.toml --no-progress \
		$(BENCH_ARGS) --out bench-out/paper --report-dir benchmarks/results/paper-seeds/pneumoniamnist & \
	$(PY) -m gradguard.cli bench --experiment benchmarks/experiments/paper-seeds-retinamnist.toml --no-progress \
		$(BENCH_ARGS) --out bench-out/paper --report-dir benchmarks/results/paper-seeds/retinamnist & \
	wait

# Clients 2 and 6 (16 images each, 4 and 2 local steps) attacked with and without the presets, seed 0.
bench-mid-clients: $(STAMP)
	$(PY) -m gradguard.cli bench --experiment benchmarks/experiments/mid-clients-pneumoniamnist.toml --no-progress \
		$(BENCH_ARGS) --out bench-out/mid-clients --report-dir benchmarks/results/mid-clients/pneumoniamnist
	$(PY) -m gradguard.cli bench --experiment benchmarks/experiments/mid-clients-retinamnist.toml --no-progress \
		$(BENCH_ARGS) --out bench-out/mid-clients --report-dir benchmarks/results/mid-clients/retinamnist

bench: bench-step bench-calibration-cost bench-shadow bench-transport

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
