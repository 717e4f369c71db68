# The two README commands: `make demo` and `make test`. Both set up .venv first (the tested stack and
# the suite installed editable). PYTHONPATH puts this checkout first even where .venv holds another
# checkout's editable install (worktrees sharing one .venv), for the tests and every stage they start.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: setup demo test test-gpu bench clean
setup:
	@bash tools/setup_venv.sh

demo: setup
	$(PY) tools/demo.py --out demo_output

# the ablation grid on the objects corpus (docs/bench.md); not part of CI: ~40 min on 2 cores
bench: setup
	$(PY) tools/bench.py --out bench_output

test: setup
	$(PY) -m pytest -q tests

test-gpu: setup
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf demo_output bench_output .pytest_cache
