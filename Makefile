# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test unit vllm-env bench bench-short clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The dispatcher on this machine: fake vLLM + consumer + sender with tokens.example.yaml.
run: $(VENV)/.installed
	$(PY) scripts/run_local.py

# The whole test suite, after starting RabbitMQ and PostgreSQL if they are down and installing vLLM
# for tests/vllm into its own cached environment (once per machine; see scripts/vllm_env.sh).
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

clean:
	rm -rf $(VENV) .pytest_cache
