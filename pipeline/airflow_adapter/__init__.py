"""The only Airflow-specific code in pipeline/: `make run`'s launcher (dag.test), the training-dataset Asset, the Celery worker's hostname callable."""
