# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# The load test's own environment: locust is a bench-only dependency, kept out of the services'.
LOCUST_VENV ?= .venv-locust
USERS ?= 24
SECONDS ?= 30
HOST ?= http://localhost:8080

.PHONY: run test unit vllm-env bench bench-short locust clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The dispatcher on this machine: fake vLLM + consumer + sender with tokens.example.yaml.
run: $(VENV)/.installed
	$(PY) scripts/run_local.py

# The whole test suite, after starting RabbitMQ, PostgreSQL and MariaDB if they are down and installing
# vLLM for tests/vllm into its own cached environment (once per machine; see scripts/vllm_env.sh).
test: $(VENV)/.installed vllm-env
	bash scripts/services.sh
	$(PY) -m pytest

# vLLM (CPU build) for the real-vLLM tests and benchmark: a few minutes the first time, then nothing.
vllm-env:
	bash scripts/vllm_env.sh >/dev/null

# Tests that need no service.
unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit tests/proxy

# The dispatcher against the fake vLLM directly and against its floor, then against the real vLLM
# (bench/RESULTS.md); needs wrk.
bench: $(VENV)/.installed vllm-env
	$(PY) bench/run.py
	$(PY) bench/real_vllm.py

# The same in a few seconds per workload, and a minute of the real vLLM (CI keeps them working;
# timings are not judged there).
bench-short: $(VENV)/.installed vllm-env
	$(PY) bench/run.py --short
	$(PY) bench/real_vllm.py --short

$(LOCUST_VENV)/.installed: bench/requirements-locust.txt
	$(PYTHON) -m venv $(LOCUST_VENV)
	$(LOCUST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCUST_VENV)/bin/python -m pip install --quiet -r bench/requirements-locust.txt
	touch $@

# bench/locustfile.py against the dispatcher of `make run` (in another terminal), USERS users for
# SECONDS seconds, headless; prints the final stats and who was shed. HOST for another dispatcher.
locust: $(LOCUST_VENV)/.installed
	$(LOCUST_VENV)/bin/locust -f bench/locustfile.py --host $(HOST) --headless --only-summary \
		--users $(USERS) --spawn-rate $(USERS) --run-time $(SECONDS)s --stop-timeout 30

clean:
	rm -rf $(VENV) $(LOCUST_VENV) .pytest_cache
