# `make demo` renders the embedded sample catalog; `make test` runs ruff, the docs build and every
# test tier but the chaos cases (`make test-chaos`: extra multi-node faults); `make test-unit` the
# unit tier alone (no Ray, S3 endpoint or browser; `slow` tests, which train, run only in
# `make test`); `make docs` the user guide into site/.
# `make gpu-smoke` runs the device check (bench/gpu/run.sh) on the CPU in a fresh Python 3.12 venv.
# Each target creates .venv first when it is missing (torch CPU wheel first, then the rest
# under constraints.txt so nothing swaps torch for a CUDA build).
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: venv demo test test-unit test-chaos lint docs bench gpu-wheels gpu-smoke clean

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) -m jobs.demo

lint: $(VENV_STAMP) docs
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# strict: a broken link, a missing anchor or a page left out of nav fails the build (and CI)
docs: $(VENV_STAMP)
	$(PY) -m mkdocs build --strict --quiet --site-dir site

# --durations: the slowest tests named in CI's output, where the 30-minute budget goes
test: lint
	$(PY) -m pytest -q -m "not chaos" --durations=30 tests

# the extra multi-node fault cases (two nodes in a row, lost during the last parts or the fold,
# no node left for the model actor)
test-chaos: $(VENV_STAMP)
	$(PY) -m pytest -q -m chaos tests

test-unit: $(VENV_STAMP)
	$(PY) -m pytest -q -m "not integration and not slow" tests

bench: $(VENV_STAMP)
	$(PY) bench/run_all.py

# .whl/: the wheels the device machine needs beyond torch + transformers (ignored by git)
gpu-wheels: $(VENV_STAMP)
	bash bench/gpu/fetch_wheels.sh

gpu-smoke: $(VENV_STAMP)
	bash bench/gpu/cpu_smoke.sh

clean:
	rm -rf .venv build site *.egg-info
