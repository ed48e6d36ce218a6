"""MLflow: runs, the run's artifact store (files between tasks), the model registry, S3 set-up."""
