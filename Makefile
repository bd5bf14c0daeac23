# feature-trimmer developer entry points. Everything runs from a local .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test bench bench-trim bench-reload bench-e2e bench-hostile bench-send demo run lint schema clean \
        mutate mutate-sample fuzz-engine lean-test triton bench-triton fuzz
.PHONY: bench-rollout

$(STAMP): setup.cfg pyproject.toml $(wildcard setup.py)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,lint,fuzz]'
	touch $(STAMP)

test: $(STAMP)           ## run the whole test suite
	$(PY) -m pytest

lean-test:               ## the lean install (lean/) on Python 3.10 and 3.13: pip check + its tests
	.ci/lean-test $(LEAN_PYTHONS)

bench-trim: $(STAMP)     ## frame trim + map compile/attach/lookup micro-benchmarks
	$(PY) bench/trim_bench.py

bench-reload: $(STAMP)   ## reload latency (rename -> 8 readers) and compile + publish
	$(PY) bench/reload_bench.py

bench-e2e: $(STAMP)      ## end to end on the demo stack: off / lz4 / trim / trim+lz4
	$(PY) bench/e2e_bench.py $(BENCH_ARGS)

bench-hostile: $(STAMP)  ## deadlines under misbehaving leaves, slow/idle clients, USS 3 vs 64 targets
	$(PY) bench/hostile_bench.py $(BENCH_ARGS)

bench-send: $(STAMP)     ## the kernel's share: receive + fan-out sends, off vs trimmed (trim/off floor)
	$(PY) bench/send_bench.py $(BENCH_ARGS)

bench-rollout: $(STAMP)  ## rollout rehearsal: 3 root hosts (namespaces), canary, rollout, rollback
	$(PY) bench/rollout_bench.py $(BENCH_ARGS)

bench-triton: $(STAMP) triton  ## root CPU + wire bytes: a v2 (Triton) target vs a native-frame target
	$(PY) bench/triton_bench.py $(BENCH_ARGS)

bench: bench-trim

# Coverage-guided fuzzing (atheris): every parsing entry point, FUZZ_SECONDS each (300 unless
# given on the command line or in the environment; fuzz-engine's own default is 600); corpora
# grow in $(FUZZ_DIR) across runs, findings land there as crash-*/timeout-*/oom-* files.
FUZZ_DIR ?= .fuzz
fuzz: $(STAMP)           ## fuzz every parser for FUZZ_SECONDS (default 300) each
	$(PY) -m fuzz.run --workdir $(FUZZ_DIR) --seconds \
	    $(if $(filter command line environment,$(origin FUZZ_SECONDS)),$(FUZZ_SECONDS),300) \
	    $(FUZZ_TARGETS)

demo: $(STAMP)           ## the whole stack on loopback: traffic, hot swap, table, checks
	$(PY) -m root_worker.testing.demo demo $(DEMO_ARGS)

run: $(STAMP)            ## the demo stack, kept up until Ctrl-C
	$(PY) -m root_worker.testing.demo run

# A real NVIDIA Triton server (the tritonserver binary nvidia-pytriton bundles) in its own
# venv: it pins numpy<2. Used by tests/test_triton.py, make demo (a fourth leaf when it is
# installed) and make bench-triton; docs/triton.md.
TRITON_VENV := .triton/venv
triton: $(TRITON_VENV)/.installed  ## install the Triton server for the tests, demo, bench
$(TRITON_VENV)/.installed: $(STAMP)
	$(PY) -m root_worker.testing.triton install
	touch $@

schema: $(STAMP)         ## regenerate flatbuffers_schema Python code with flatc
	$(PY) -m flatbuffers_schema.regen
	$(PY) -m root_worker.frame.cheader

# mypy --strict covers the public API: frame codec + trim engine, name keys, the contracts,
# the map reader, the bundle parser and the root's contract library (config: [mypy] in setup.cfg).
STRICT := root_worker/frame flatbuffers_schema/keys.py flatbuffers_schema/settings.py \
          flatbuffers_schema/wire.py flatbuffers_schema/shm_layout.py \
          flatbuffers_schema/atomic_file.py flatbuffers_schema/feature_map.py \
          root_worker/featuremap/map_reader.py trimmer_daemon/bundle/parse.py \
          root_worker/contract.py

lint: $(STAMP)           ## ruff (pinned) + mypy --strict on the public API
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict $(STRICT)

# The C trim engine under AddressSanitizer + UBSan (gcc): the frame tests against a sanitized
# build of _copyruns, then the aliasing-on fuzzer (fuzz/engine/) for FUZZ_SECONDS.
FUZZ_SECONDS ?= 600
fuzz-engine: $(STAMP)    ## C trim engine under ASan/UBSan: frame tests, then fuzz FUZZ_SECONDS
	$(PY) fuzz/engine/sanitized.py tests
	$(PY) fuzz/engine/sanitized.py fuzz --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache mutants

# Mutation testing (docs/testing.md; mutmut, config in setup.cfg): the functions whose bugs
# cost correctness -- frame format and codec, the trim plan checks, the shm layout and the
# publisher's publication path, the bundle state machine, the watcher's hold, the map
# reader, the buffer pool. `make mutate` runs them all from scratch (~15 min on a
# 2-core machine, niced), prints the score per module and every survivor, and fails on a
# survivor not listed as equivalent in docs/testing.md;
# `make mutate-sample` (CI) runs a fixed few functions the same way.
MUTATE_TARGETS := 'root_worker.frame.format.*' 'root_worker.frame.codec.*' \
    'root_worker.frame.check.*' 'root_worker.frame.trim.*_prepare__*' \
    'root_worker.frame.trim.*_Plan*' 'root_worker.frame.trim.*_new_plan__*' \
    'root_worker.frame.trim.*_new_size_plan__*' 'flatbuffers_schema.shm_layout.*' \
    'trimmer_daemon.publisher.*_flip__*' 'trimmer_daemon.publisher.*publish__*' \
    'trimmer_daemon.publisher.*publish_parts__*' 'trimmer_daemon.publisher.*_write_blob__*' \
    'trimmer_daemon.publisher.*_recover__*' 'trimmer_daemon.publisher.*reclaim__*' \
    'trimmer_daemon.publisher.*_make_room__*' 'trimmer_daemon.publisher.*_room_for__*' \
    'trimmer_daemon.publisher.*_blob_size__*' 'trimmer_daemon.publisher.*_scan_blobs__*' \
    'trimmer_daemon.state.*' 'trimmer_daemon.watcher.*_track_writers__*' \
    'trimmer_daemon.watcher.*held_since__*' 'trimmer_daemon.watcher.*modifications__*' \
    'trimmer_daemon.watcher.*ǁsync__*' 'root_worker.featuremap.map_reader.*' \
    'root_worker.service.buffers.*'

mutate: $(STAMP)         ## mutation testing of the correctness-critical modules (docs/testing.md)
	rm -rf mutants
	nice -n 10 timeout 3600 .ci/private-shm $(VENV)/bin/mutmut run --max-children 2 $(MUTATE_TARGETS)
	$(PY) tests/mutation_report.py --strict

mutate-sample: $(STAMP)  ## CI: a fixed sample of mutants (tests/mutation_sample.py); fails on a new survivor
	nice -n 10 timeout 600 .ci/private-shm $(PY) tests/mutation_sample.py
