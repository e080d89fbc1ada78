# The two commands of the README. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: test demo demo-benchmark bench clean test-matrix

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade "pip>=23" "setuptools>=77" wheel
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(VENV)/bin/python demo/run_demo.py

demo-benchmark: $(STAMP)
	$(VENV)/bin/python demo/run_demo.py --benchmark

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_losses.py
	$(VENV)/bin/python bench/bench_calibration.py
	$(VENV)/bin/python bench/bench_posthoc.py --fiducio lbfgs
	$(VENV)/bin/python bench/bench_validation.py
	$(VENV)/bin/python bench/bench_predict.py

# Not in CI: the wheel in fresh venvs of Python 3.10-3.13 and nnunetv2 2.8.x (other Pythons download torch, several
# GB; the venvs stay in .matrix/ for reruns). Writes docs/version-matrix.md. MATRIX_ARGS="--cells NAME..." for a subset.
MATRIX_ARGS ?=
test-matrix: $(STAMP)
	$(VENV)/bin/python tests/matrix/run_matrix.py $(MATRIX_ARGS)

clean:
	rm -rf $(VENV) demo_output build dist *.egg-info
