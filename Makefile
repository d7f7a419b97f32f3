# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test unit bench bench-short clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The dispatcher on this machine: fake vLLM + consumer + sender with tokens.example.yaml.
run: $(VENV)/.installed
	$(PY) scripts/run_local.py

# The whole test suite, after starting RabbitMQ, PostgreSQL and MariaDB if they are down.
test: $(VENV)/.installed
	bash scripts/services.sh
	$(PY) -m pytest

# Tests that need no service.
unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit tests/proxy

# The dispatcher against the fake vLLM directly and against its floor (bench/RESULTS.md); needs wrk.
bench: $(VENV)/.installed
	$(PY) bench/run.py

# The same in a few seconds per workload (CI keeps it working; timings are not judged there).
bench-short: $(VENV)/.installed
	$(PY) bench/run.py --short

clean:
	rm -rf $(VENV) .pytest_cache
