"""The name Airflow records as a task instance's hostname (`AIRFLOW__CORE__HOSTNAME_CALLABLE=
pipeline.airflow_adapter.worker_name.worker_name`).

Several Celery workers on one machine would all show the machine's name; each worker of
`make up EXECUTOR=celery` runs with `PIPELINE_WORKER_NAME` set (`worker-1`, `worker-2`, ...), so
the UI and the REST API say which worker ran a task. Anywhere else (other Airflow components, a
worker started without it) the machine's fully qualified name is used, as Airflow's default does.
"""
from __future__ import annotations

import os
import socket


def worker_name() -> str:
    return os.environ.get("PIPELINE_WORKER_NAME") or socket.getfqdn()
