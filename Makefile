# `make demo` renders the embedded sample catalog; `make test` runs the test suite.
# Each target creates .venv first when it is missing (torch CPU wheel first, then the rest
# under constraints.txt so nothing swaps torch for a CUDA build).
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: venv demo test test-fast bench clean

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) -m jobs.demo

test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

bench: $(VENV_STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf .venv build *.egg-info
