#!/usr/bin/env bash
# One-shot set-up of the scale-out stack (the compose service `airflow-init`; every other Airflow
# service starts only after it exits 0):
#   1. refuse to start with a "change-me" placeholder left over from docker/.env.example,
#   2. check the Fernet key is one (a bad key otherwise fails much later, on the first secret stored),
#   3. migrate the Airflow metadata database and set the pool `training` (both idempotent),
#   4. write the admin's password for Airflow 3's default simple auth manager: it reads user passwords
#      from AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE (a volume shared with the api-server).
#      The file is rewritten on every run, so changing AIRFLOW_ADMIN_PASSWORD in docker/.env and
#      running `docker compose up -d` again rotates the password.
# Only the Airflow-side secrets are in this container's environment, so only they are checked here;
# docker/make-env.sh replaces every placeholder at once.
set -euo pipefail

placeholders=$(env | grep -i 'change-me' | cut -d= -f1 | sort | tr '\n' ' ' || true)
if [[ -n "${placeholders}" ]]; then
  echo "airflow-init: still a 'change-me' placeholder from .env.example in: ${placeholders}" >&2
  echo "airflow-init: set real secrets in docker/.env (docker/make-env.sh writes them; see docker/README.md)" >&2
  exit 1
fi

python - <<'PY'
import os
import sys

from cryptography.fernet import Fernet

try:
    Fernet(os.environ["AIRFLOW__CORE__FERNET_KEY"])
except (KeyError, ValueError) as error:
    sys.exit(f"airflow-init: AIRFLOW_FERNET_KEY is not a Fernet key ({error}); "
             "make one with: openssl rand -base64 32 | tr '+/' '-_'")
PY

airflow db migrate

# The pool the DAG's train and optimize take a slot of: training at once across DAG runs. One
# slot per airflow-worker-training container is a good size (AIRFLOW_TRAINING_POOL_SLOTS).
airflow pools set training "${AIRFLOW_TRAINING_POOL_SLOTS:-1}" \
  "model_compression's train and optimize: training at once across DAG runs"

python - <<'PY'
import json
import os
from pathlib import Path

path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
tmp = path.with_name(path.name + ".tmp")
# Written whole and renamed: the api-server never reads a half-written file.
tmp.write_text(json.dumps({os.environ["AIRFLOW_ADMIN_USERNAME"]: os.environ["AIRFLOW_ADMIN_PASSWORD"]}) + "\n")
tmp.chmod(0o600)
tmp.replace(path)
print(f"airflow-init: admin user {os.environ['AIRFLOW_ADMIN_USERNAME']!r} written to {path}")
PY
