# The two README commands: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: setup demo test test-gpu clean
setup:
	@bash tools/setup_venv.sh

demo: setup
	$(PY) tools/demo.py --out demo_output

test: setup
	$(PY) -m pytest -q tests

test-gpu: setup
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf demo_output .pytest_cache
