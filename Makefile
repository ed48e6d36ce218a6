# One-command set-up: every target installs what it needs (virtualenv, locked requirements,
# the Debian dataset package, an Airflow home inside the project).
SHELL := /bin/bash
# The interpreter of the virtualenv: the first of these that runs here (the dependency set
# installs on each: README "Python versions"); e.g. make install PYTHON=python3.13.
SUPPORTED_PYTHONS := python3.11 python3.12 python3.13
PYTHON ?= $(firstword $(foreach python,$(SUPPORTED_PYTHONS),$(if $(shell $(python) -c '' 2>/dev/null && echo yes),$(python))))
VENV := .venv
PY := $(VENV)/bin/python
export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION := False
export TF_USE_LEGACY_KERAS := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TF_CPP_MIN_LOG_LEVEL := 2
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Extra options for `make run`, e.g. make run ARGS="--train-limit 5000 --variants float32,int8"
ARGS ?=

.PHONY: help install dataset airflow-db run cli lint test test-fast test-stack test-slow chromium bench bench-small mlflow-ui serve lock clean
help:
	@echo "make run        the whole DAG end to end through Airflow (embedded SQLite, local MLflow)"
	@echo "make test       the test suite (what CI runs): make test-fast, then make test-stack"
	@echo "make test-fast  lint, unit and quick single-process pipeline tests (a developer's loop, 2-4 min)"
	@echo "make test-stack the rest: whole pipeline and DAG runs, servers, the local stack, Chromium, Celery"
	@echo "make test-slow  the load test, packaging into fresh virtualenvs, a whole make bench --quick"
	@echo "make bench      side-by-side performance tables (benchmarks/results.md)"
	@echo "make bench-small  every training-time technique on three small models (~6 min)"
	@echo "make cli        the same pipeline without Airflow (python -m pipeline run)"
	@echo "make mlflow-ui  the MLflow UI on http://127.0.0.1:5000 for the local store"
	@echo "make serve      the registered champion over REST on http://127.0.0.1:5001 (MODEL=models:/...)"
	@echo "make up         MLflow server + Airflow on 127.0.0.1 (:5000, :8080); make status / make down"
	@echo "make up EXECUTOR=celery WORKERS=2   the same on PostgreSQL, Redis, S3 and Celery workers"

# pyproject.toml's extras: `airflow` (Airflow, the Celery executor, PostgreSQL drivers) and
# `stack` (supervisord, moto_server: what `make up` runs) are small next to the TensorFlow stack,
# so always installed; `test` and `bench` for make test and make bench. constraints.txt locks
# every transitive version. The project is installed editable (importable by Airflow's
# processes, the `model-compression` console script, the plugin's entry point); setuptools
# leaves an .egg-info in the project folder, which is removed: the project folder is on
# sys.path for `python -m` and the tests, and Airflow would find the plugin's entry point twice.
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || { test -n "$(PYTHON)" || { echo "no python3.11, python3.12 or python3.13 runs here: install one, or make PYTHON=/path/to/python" >&2; exit 1; }; \
	  $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[airflow,stack]" -c constraints.txt
	rm -rf model_compression_pipeline.egg-info
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[airflow,stack,test,bench]" -c constraints.txt
	rm -rf model_compression_pipeline.egg-info
	@touch $@

# After changing pyproject.toml's requirements (and installing): rewrite constraints.txt from the
# virtualenv, then the hashed locks from it with uv (requirements.lock: the package and its
# `airflow` extra, for docker/Dockerfile; docker/mlflow/requirements.lock for the MLflow image).
LOCK_OPTIONS := -c constraints.txt --generate-hashes --python-version 3.11 --python-platform linux --quiet
lock:
	$(PY) -m pip freeze --exclude-editable --exclude uv | grep -v '^model-compression-pipeline' \
	  | cat <(sed -n '1,3p' constraints.txt) - > constraints.tmp && mv constraints.tmp constraints.txt
	$(PY) -m pip install --quiet "uv>=0.13,<0.14"
	$(VENV)/bin/uv pip compile pyproject.toml --extra airflow $(LOCK_OPTIONS) -o requirements.lock
	$(VENV)/bin/uv pip compile docker/mlflow/requirements.in $(LOCK_OPTIONS) -o docker/mlflow/requirements.lock

install: $(VENV)/.installed

dataset:
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	fi
	@test -f $(FASHION_MNIST) || { echo "Fashion-MNIST is still missing: apt-get install dataset-fashion-mnist" >&2; exit 1; }

$(AIRFLOW_HOME)/.migrated: $(VENV)/.installed
	@mkdir -p $(AIRFLOW_HOME)
	$(VENV)/bin/airflow db migrate >/dev/null
	@touch $@

airflow-db: $(AIRFLOW_HOME)/.migrated

run: install dataset airflow-db
	$(PY) -m pipeline.airflow_adapter.launch $(ARGS)

cli: install dataset
	$(PY) -m pipeline run $(ARGS)

# The test tiers (markers registered in pyproject.toml): make test = lint, types and every test
# but the slow ones (what the README and CI run: test-fast's and test-stack's tests together);
# test-fast = lint, unit and quick single-process pipeline tests (measured 1.6-3.5 min, median
# 2.4, on 2 cores shared at load average 2-6; 1.5-2 min of CPU); test-stack = the rest: those
# marked `pipeline` (a DAG run through Airflow, a whole CLI/API run or a `python -m pipeline`
# process, a moto, MLflow or PostgreSQL server process, a chain of trainings or minutes of
# training) and those that start the local stack (scripts/stack.py), Chromium or Celery workers.
# Each target installs what its tests need.
FAST_TESTS := not stack and not browser and not celery and not bench and not pipeline and not slow
STACK_TESTS := (stack or browser or celery or bench or pipeline) and not slow
# lint: ruff, mypy and ARCHITECTURE.md's layers as import contracts (pyproject.toml).
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check pipeline dags plugins tests benchmarks scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# The tests run in TEST_WORKERS processes (pytest-xdist), a test module per process at a time
# (module fixtures are built once): most tests keep one core busy (small models, waits on
# servers and Airflow), so 2 processes on 2 cores roughly halve the time. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: lint dataset chromium stack-servers
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

test-fast: lint dataset
	$(PY) -m pytest -q $(XDIST) -m "$(FAST_TESTS)" tests

test-stack: $(VENV)/.installed-test dataset chromium stack-servers
	$(PY) -m pytest -q $(XDIST) -m "$(STACK_TESTS)" tests

# The load test (4 concurrent DAG runs on the local stack; ~10 min on 2 cores), the packaging
# tests (fresh virtualenvs), a whole `make bench --quick` (~35 min) and anything else marked slow.
test-slow: $(VENV)/.installed-test dataset stack-servers
	$(PY) -m pytest -q -m slow tests

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
# Ubuntu has no Chromium package (only a snap): there the browser tests use Playwright's own
# Chromium when it is installed, else they are skipped with that command.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "installing chromium (Debian package)"; \
	  $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null; } || \
	  true; \
	fi
	@test -x /usr/bin/chromium || ! grep -qx 'ID=ubuntu' /etc/os-release || { \
	  echo "Ubuntu ships Chromium only as a snap: the browser tests are skipped unless" \
	       "Playwright's own Chromium is installed ($(PY) -m playwright install chromium)" >&2; }
	@test -x /usr/bin/chromium || grep -qx 'ID=ubuntu' /etc/os-release || \
	  { echo "Chromium is still missing: apt-get install chromium" >&2; exit 1; }

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[airflow,stack,bench]" -c constraints.txt
	rm -rf model_compression_pipeline.egg-info
	@touch $@

# Side-by-side performance tables: benchmarks/results.md and results.json (trains the default CNN;
# ~30+ min on 2 cores, or `ARGS="--reuse-run .work/<run>"` to measure a finished run: ~11-19 min);
# ARGS=--quick checks the tables in ~4 min.
bench: $(VENV)/.installed-bench dataset airflow-db
	$(PY) -m benchmarks.run $(ARGS)

# Every training-time technique on three small models of 540 images, the CNN's epochs and batch
# size as given against sized to the data (benchmarks/small-models.md): ~6 min.
bench-small: install
	$(PY) -m benchmarks.small_models $(ARGS)

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.mlflow/mlflow.db --host 127.0.0.1 --port 5000

# Serve a registered model over REST (default: the champion of `make run`'s registered model),
# after writing its stored request body to .work/serving_input_example.json for curl -d @...
MODEL ?= models:/fashion-mnist-classifier@champion
SERVE_PORT ?= 5001
serve: install
	$(PY) -m pipeline.serving example "$(MODEL)" .work/serving_input_example.json
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/.mlflow/mlflow.db} \
	  $(VENV)/bin/mlflow models serve -m "$(MODEL)" --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

clean:
	rm -rf .work .airflow/logs

# The local service stack on 127.0.0.1, run by supervisord (scripts/stack.py): MLflow server (port
# MLFLOW_PORT, default 5000) and Airflow (AIRFLOW_PORT, default 8080); with EXECUTOR=celery also
# PostgreSQL, Redis, an S3 endpoint and WORKERS Celery workers. Logs and data in .stack/.
EXECUTOR ?= local
.PHONY: up down status stack-servers
up: install dataset $(if $(filter celery Celery CeleryExecutor,$(EXECUTOR)),stack-servers)
	$(PY) scripts/stack.py up

# PostgreSQL and Redis servers for EXECUTOR=celery (Debian packages), installed when missing.
stack-servers:
	@missing=""; \
	command -v redis-server >/dev/null || missing=" redis-server"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (Debian packages)"; \
	  $(SUDO) apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $$missing >/dev/null; }; \
	fi

down:
	@if [ -x $(PY) ]; then $(PY) scripts/stack.py down; else echo "nothing to stop (no $(VENV))"; fi

status:
	@if [ -x $(PY) ]; then $(PY) scripts/stack.py status; else echo "the stack is not installed (no $(VENV)): make up"; fi
