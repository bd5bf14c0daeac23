"""Coverage-guided fuzz targets (atheris, libFuzzer) for every parsing entry point.

One module per target; each runs as ``python -m fuzz.<target> [libFuzzer flags] [corpus]``
and asserts that only its entry point's documented error types escape (anything else, and
any broken invariant, is a finding). ``python -m fuzz.run`` writes each target's seed
corpus (:mod:`fuzz.seeds`) and runs the targets for a bounded time; ``make fuzz`` runs them
for ``FUZZ_SECONDS`` each, ``tests/test_fuzz_smoke.py`` for a few seconds each. Needs the
``fuzz`` extra (``pip install -e '.[fuzz]'``: atheris).
"""
