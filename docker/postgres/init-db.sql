-- One PostgreSQL server, two databases: `airflow` (Airflow metadata and the Celery result backend) and
-- `mlflow` (the MLflow tracking and registry store), each owned by its own login role.
-- Mounted into /docker-entrypoint-initdb.d, so it runs once, when the data volume is empty, as the
-- POSTGRES_USER superuser. Names and passwords come from the container's environment (psql's \getenv,
-- PostgreSQL 15+) and are quoted by psql (:"ident", :'literal'), never pasted into SQL text.
\set ON_ERROR_STOP on
\getenv airflow_user AIRFLOW_DB_USER
\getenv airflow_password AIRFLOW_DB_PASSWORD
\getenv mlflow_user MLFLOW_DB_USER
\getenv mlflow_password MLFLOW_DB_PASSWORD

CREATE ROLE :"airflow_user" LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER :"airflow_user";
CREATE ROLE :"mlflow_user" LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER :"mlflow_user";
