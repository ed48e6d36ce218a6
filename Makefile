# One-command set-up: every target installs what it needs (virtualenv, pinned requirements,
# the Debian dataset package, an Airflow home inside the project).
SHELL := /bin/bash
PYTHON ?= python3.11
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

.PHONY: help install dataset airflow-db run cli test test-slow bench mlflow-ui serve lock clean
help:
	@echo "make run        the whole DAG end to end through Airflow (embedded SQLite, local MLflow)"
	@echo "make test       the test suite"
	@echo "make bench      side-by-side performance tables (benchmarks/results.md)"
	@echo "make cli        the same pipeline without Airflow (python -m pipeline run)"
	@echo "make mlflow-ui  the MLflow UI on http://127.0.0.1:5000 for the local store"
	@echo "make serve      the registered champion over REST on http://127.0.0.1:5001 (MODEL=models:/...)"
	@echo "make up         MLflow server + Airflow on 127.0.0.1 (:5000, :8080); make status / make down"
	@echo "make up EXECUTOR=celery WORKERS=2   the same on PostgreSQL, Redis, S3 and Celery workers"

# requirements-celery.txt and requirements-stack.txt: what `make up` runs (supervisord, the
# Celery executor, moto_server); small next to the TensorFlow stack, so always installed.
RUNTIME_REQUIREMENTS := requirements.txt requirements-celery.txt requirements-stack.txt
# constraints.txt locks every transitive version; the project itself is installed editable
# (importable by Airflow's processes, `model-compression` console script).
$(VENV)/.installed: $(RUNTIME_REQUIREMENTS) constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(addprefix -r ,$(RUNTIME_REQUIREMENTS)) -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-test.txt -r requirements-bench.txt -c constraints.txt
	@touch $@

# Rewrite constraints.txt from the virtualenv (after changing a requirements file and installing).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^model-compression-pipeline' \
	  | cat <(sed -n '1,2p' constraints.txt) - > constraints.tmp && mv constraints.tmp constraints.txt

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

test: $(VENV)/.installed-test dataset
	$(VENV)/bin/ruff check pipeline dags plugins tests benchmarks scripts
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -m "not slow" tests

# The load test (4 concurrent DAG runs on the local stack; ~10 min on 2 cores) and anything else
# marked slow.
test-slow: $(VENV)/.installed-test dataset
	$(PY) -m pytest -q -m slow tests

$(VENV)/.installed-bench: $(VENV)/.installed requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt -c constraints.txt
	@touch $@

# Side-by-side performance tables: benchmarks/results.md and results.json (trains the default CNN;
# ~30+ min on 2 cores, or `ARGS="--reuse-run .work/<run>"` to measure a finished run: ~11-19 min);
# ARGS=--quick checks the tables in ~4 min.
bench: $(VENV)/.installed-bench dataset airflow-db
	$(PY) -m benchmarks.run $(ARGS)

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.mlflow/mlflow.db --host 127.0.0.1 --port 5000

# Serve a registered model over REST (default: the champion of `make run`'s registered model),
# after writing its stored request body to .work/serving_input_example.json for curl -d @...
MODEL ?= models:/fashion-mnist-classifier@champion
SERVE_PORT ?= 5001
serve: install
	$(PY) -m pipeline.store.registry example "$(MODEL)" .work/serving_input_example.json
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
