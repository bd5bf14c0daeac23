# feature-trimmer developer entry points. Everything runs from a local .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test bench bench-trim bench-reload bench-e2e bench-hostile bench-send demo run lint schema clean fuzz

$(STAMP): setup.cfg pyproject.toml $(wildcard setup.py)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,lint,fuzz]'
	touch $(STAMP)

test: $(STAMP)           ## run the whole test suite
	$(PY) -m pytest

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

bench: bench-trim

# Coverage-guided fuzzing (atheris): every parsing entry point, FUZZ_SECONDS each; corpora
# grow in $(FUZZ_DIR) across runs, findings land there as crash-*/timeout-*/oom-* files.
FUZZ_SECONDS ?= 300
FUZZ_DIR ?= .fuzz
fuzz: $(STAMP)           ## fuzz every parser for FUZZ_SECONDS (default 300) each
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS) --workdir $(FUZZ_DIR) $(FUZZ_TARGETS)

demo: $(STAMP)           ## the whole stack on loopback: traffic, hot swap, table, checks
	$(PY) -m root_worker.testing.demo demo $(DEMO_ARGS)

run: $(STAMP)            ## the demo stack, kept up until Ctrl-C
	$(PY) -m root_worker.testing.demo run

schema: $(STAMP)         ## regenerate flatbuffers_schema Python code with flatc
	$(PY) -m flatbuffers_schema.regen
	$(PY) -m root_worker.frame.cheader

# mypy --strict covers the public API: frame codec + trim engine, name keys, the contracts,
# the map reader and the bundle parser (config: [mypy] in setup.cfg).
STRICT := root_worker/frame flatbuffers_schema/keys.py flatbuffers_schema/settings.py \
          flatbuffers_schema/wire.py flatbuffers_schema/shm_layout.py \
          flatbuffers_schema/atomic_file.py flatbuffers_schema/feature_map.py \
          root_worker/featuremap/map_reader.py trimmer_daemon/bundle/parse.py

lint: $(STAMP)           ## ruff (pinned) + mypy --strict on the public API
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict $(STRICT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
