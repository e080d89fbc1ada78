# The two commands of the README. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade "pip>=23" "setuptools>=77" wheel
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/python demo/run_demo.py

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_losses.py
	$(VENV)/bin/python bench/bench_calibration.py
	$(VENV)/bin/python bench/bench_validation.py

clean:
	rm -rf $(VENV) demo_output build dist *.egg-info
