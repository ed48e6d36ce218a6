"""Static checks of the scale-out stack in docker/ (no Docker engine needed).

Each rule is a small checker returning the problems it finds in a parsed compose file (or a
Dockerfile's text). A test runs it on the real file and expects nothing, then breaks a copy on
purpose and expects the checker to say so, so no rule passes by being unable to fail.
Where the `docker compose` plugin exists, `docker compose config` validates the file as well, and
where Docker Hub answers, every image the stack pulls (compose `image:`s and Dockerfile `FROM`s) is
looked up in the registry (its v2 API, an anonymous pull token): a tag that is no longer published
fails the test instead of `docker compose up`.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"
MLFLOW_DOCKERFILE = DOCKER / "mlflow" / "Dockerfile"
MLFLOW_LOCK = DOCKER / "mlflow" / "requirements.lock"
LOCK = ROOT / "requirements.lock"
CONSTRAINTS = ROOT / "constraints.txt"
PYPROJECT = ROOT / "pyproject.toml"
INIT_DB_SQL = DOCKER / "postgres" / "init-db.sql"
AIRFLOW_INIT = DOCKER / "airflow-init.sh"
MAKE_ENV = DOCKER / "make-env.sh"

AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker", "airflow-worker-training"}
WORKER_SERVICES = {"airflow-worker": "default", "airflow-worker-training": "training"}
# The DAG's queues (DESIGN: Celery topology): train and optimize on `training`, the rest on `default`.
QUEUES = ("training", "default")
ONE_SHOT_SERVICES = {"airflow-init", "s3-init"}
# Repositories whose images are no longer published: MinIO stopped publishing images in 2025.
UNPUBLISHED_REPOSITORIES = ("minio/",)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET")

# Compose interpolation: `$$` escapes a dollar; `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
# `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`, `${VAR+alt}` and `$VAR` are references.
_REFERENCE = re.compile(
    r"\$(?:(?P<escape>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


# ---------------------------------------------------------------------------------------------------
# Reading the files


def compose_text() -> str:
    return COMPOSE_FILE.read_text()


def load_compose(text: str | None = None) -> dict:
    return yaml.safe_load(compose_text() if text is None else text)


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def variable_references(text: str) -> list[tuple[str, str | None]]:
    """(name, operator) for every variable reference in compose-file text, escapes skipped."""
    refs = []
    for match in _REFERENCE.finditer(text):
        if match["escape"]:
            continue
        refs.append((match["braced"] or match["bare"], match["op"]))
    return refs


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation of every string in a parsed compose file."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escape"]:
            return "$"
        name, op, arg = match["braced"] or match["bare"], match["op"], match["arg"]
        is_set = name in env
        is_nonempty = bool(env.get(name))
        if op in ("-", ":-"):
            return env[name] if (is_nonempty if op == ":-" else is_set) else arg
        if op in ("+", ":+"):
            return arg if (is_nonempty if op == ":+" else is_set) else ""
        if op in ("?", ":?") and not (is_nonempty if op == ":?" else is_set):
            raise KeyError(f"{name}: {arg}")
        return env.get(name, "")

    return _REFERENCE.sub(substitute, value)


def resolved_compose() -> dict:
    return interpolate(load_compose(), read_env_file())


def as_dict(environment) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {key: "" if value is None else str(value) for key, value in (environment or {}).items()}


def command_args(service: dict) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(arg) for arg in command]


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume of a service, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append((volume.get("source", ""), volume["target"]))
        else:
            parts = volume.split(":")
            mounts.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return mounts


def parse_port(port) -> tuple[str, str, str]:
    """(host_ip, host_port, container_port) of a short or long port entry; '' when absent."""
    if isinstance(port, dict):
        return (str(port.get("host_ip", "")), str(port.get("published", "")), str(port.get("target", "")))
    text = str(port)
    if text.startswith("["):  # [ipv6]:host:container
        ip, _, rest = text[1:].partition("]:")
        host, _, container = rest.partition(":")
        return ip, host, container
    parts = text.split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return "", parts[0], parts[1]
    return "", "", parts[0]


def is_one_shot(service: dict) -> bool:
    return str(service.get("restart", "")) == "no"


# ---------------------------------------------------------------------------------------------------
# Checkers: each returns a list of problems (empty = fine)


def services_without_image_or_build(compose: dict) -> list[str]:
    return [name for name, service in compose["services"].items()
            if not service.get("image") and not service.get("build")]


def unpinned_images(compose: dict) -> list[str]:
    """Images pulled from a registry must name a version: no bare name, no :latest."""
    problems = []
    for name, service in compose["services"].items():
        if service.get("build"):
            continue  # built here from pinned requirements; the tag is only a local name
        image = str(service.get("image", ""))
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "@sha256:" not in image and (not tag or tag == "latest"):
            problems.append(f"{name}: {image!r} is not pinned")
    return problems


def unpublished_images(compose: dict) -> list[str]:
    """Images from repositories that no longer publish them (`docker compose up` fails at the pull)."""
    return [f"{name}: {service['image']!r} is no longer published" for name, service in compose["services"].items()
            if str(service.get("image", "")).startswith(UNPUBLISHED_REPOSITORIES)]


def pulled_images(compose: dict) -> set[str]:
    """What the stack pulls from a registry: compose images without a build, Dockerfile bases."""
    images = {str(service["image"]) for service in compose["services"].values()
              if service.get("image") and not service.get("build")}
    for dockerfile in (DOCKERFILE, MLFLOW_DOCKERFILE):
        images |= set(re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", dockerfile.read_text(), re.M))
    return images


def image_reference(image: str) -> tuple[str, str, str]:
    """(registry host, repository, tag or digest) of an image name as Docker resolves it."""
    name, digest_sep, digest = image.partition("@")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "registry-1.docker.io", name
        if "/" not in path:
            path = "library/" + path
    repository, colon, tag = path.rpartition(":") if ":" in path.rsplit("/", 1)[-1] else (path, "", "latest")
    return registry, repository, digest if digest_sep else tag


class RegistryUnreachable(Exception):
    """The registry did not answer (no network): the image could not be checked."""


def published_in_registry(image: str, timeout: float = 15) -> bool:
    """Whether Docker Hub serves a manifest for `image` (v2 API, anonymous pull token)."""
    registry, repository, reference = image_reference(image)
    if registry != "registry-1.docker.io":
        raise RegistryUnreachable(f"{registry}: only Docker Hub is checked")
    try:
        token_url = ("https://auth.docker.io/token?service=registry.docker.io"
                     f"&scope=repository:{repository}:pull")
        with urllib.request.urlopen(token_url, timeout=timeout) as response:
            token = json.loads(response.read())["token"]
        request = urllib.request.Request(
            f"https://{registry}/v2/{repository}/manifests/{reference}", method="HEAD",
            headers={"Authorization": f"Bearer {token}", "Accept": ", ".join((
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json",
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json"))})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except urllib.error.HTTPError as error:
        if error.code in (401, 404):  # 401: the repository does not exist (no pull scope granted)
            return False
        raise RegistryUnreachable(f"HTTP {error.code} from the registry") from None
    except (urllib.error.URLError, OSError) as error:
        raise RegistryUnreachable(str(getattr(error, "reason", error))) from None


def undefined_variables(text: str, env: dict[str, str]) -> set[str]:
    """Variables the compose text needs (no default given) that the env file does not define."""
    return {name for name, op in variable_references(text)
            if op not in ("-", ":-", "+", ":+") and name not in env}


def undocumented_env_lines(path: Path) -> list[str]:
    """Variables of an env file without a comment on the line right above them."""
    problems, previous = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not previous.startswith("#"):
            problems.append(stripped.partition("=")[0])
        previous = stripped
    return problems


def secrets_not_placeholders(env: dict[str, str]) -> list[str]:
    return [name for name, value in env.items() if SECRET_NAME.search(name) and "change-me" not in value]


def long_running_without_healthcheck(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        check = service.get("healthcheck") or {}
        if not is_one_shot(service) and (not check.get("test") or check.get("disable")):
            problems.append(name)
    return problems


def dependency_problems(compose: dict) -> list[str]:
    """depends_on must wait for health (long-running) or success (one-shot), never just a start."""
    services, problems = compose["services"], []
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):
            problems.append(f"{name}: depends_on without conditions")
            continue
        for target, rule in depends_on.items():
            if target not in services:
                problems.append(f"{name}: depends on unknown service {target}")
                continue
            wanted = "service_completed_successfully" if is_one_shot(services[target]) else "service_healthy"
            if (rule or {}).get("condition") != wanted:
                problems.append(f"{name} -> {target}: condition should be {wanted}")
    return problems


def undeclared_named_volumes(compose: dict) -> list[str]:
    declared = set(compose.get("volumes") or {})
    problems = []
    for name, service in compose["services"].items():
        for source, _ in volume_mounts(service):
            is_path = source.startswith((".", "/", "~", "$"))
            if source and not is_path and source not in declared:
                problems.append(f"{name}: volume {source!r} is not declared")
    return problems


def connection_problems(compose: dict) -> list[str]:
    """Executor, broker, result backend, metadata DB and MLflow URIs point at this stack's services."""
    services, problems = compose["services"], []

    def expect(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    redis_port = "6379"
    redis_args = command_args(services.get("redis", {}))
    if "--port" in redis_args:
        redis_port = redis_args[redis_args.index("--port") + 1]

    for name in sorted(AIRFLOW_SERVICES & set(services)):
        env = as_dict(services[name].get("environment"))
        expect(env.get("AIRFLOW__CORE__EXECUTOR") == "CeleryExecutor", f"{name}: executor is not CeleryExecutor")

        broker = urlsplit(env.get("AIRFLOW__CELERY__BROKER_URL", ""))
        expect(broker.scheme == "redis", f"{name}: broker is not redis://")
        expect(broker.hostname in services and "redis" in str(services.get(broker.hostname, {}).get("image")),
               f"{name}: broker host {broker.hostname!r} is not the redis service")
        expect(str(broker.port or 6379) == redis_port, f"{name}: broker port {broker.port} is not {redis_port}")

        for key, scheme, database in (("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql+psycopg2", "/airflow"),
                                      ("AIRFLOW__CELERY__RESULT_BACKEND", "db+postgresql", "/airflow")):
            url = urlsplit(env.get(key, ""))
            expect(url.scheme == scheme, f"{name}: {key} scheme is {url.scheme!r}, not {scheme!r}")
            expect(url.hostname == "postgres" and "postgres" in services, f"{name}: {key} is not on the postgres service")
            expect(url.path == database, f"{name}: {key} database is {url.path!r}")

        api = urlsplit(env.get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", ""))
        api_args = command_args(services.get("airflow-apiserver", {}))
        api_port = api_args[api_args.index("--port") + 1] if "--port" in api_args else "8080"
        expect(api.hostname == "airflow-apiserver" and str(api.port) == api_port and api.path == "/execution/",
               f"{name}: execution API URL {api.geturl()!r} is not the api-server's /execution/")

        tracking = urlsplit(env.get("MLFLOW_TRACKING_URI", ""))
        mlflow_args = command_args(services.get("mlflow", {}))
        mlflow_port = mlflow_args[mlflow_args.index("--port") + 1] if "--port" in mlflow_args else ""
        expect(tracking.hostname == "mlflow" and str(tracking.port) == mlflow_port,
               f"{name}: MLFLOW_TRACKING_URI {tracking.geturl()!r} is not the mlflow service")
    return problems


def mlflow_problems(compose: dict) -> list[str]:
    services, problems = compose["services"], []
    mlflow = services.get("mlflow", {})
    args = command_args(mlflow)

    def option(flag: str) -> str:
        return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else ""

    if args[:2] != ["mlflow", "server"]:
        problems.append("mlflow: command is not `mlflow server`")
    destination = urlsplit(option("--artifacts-destination"))
    if destination.scheme != "s3" or not destination.netloc:
        problems.append("mlflow: --artifacts-destination is not an s3:// bucket")
    store = urlsplit(option("--backend-store-uri"))
    if store.scheme != "postgresql" or store.hostname != "postgres" or store.path != "/mlflow":
        problems.append("mlflow: --backend-store-uri is not the mlflow database on the postgres service")
    endpoint = urlsplit(as_dict(mlflow.get("environment")).get("MLFLOW_S3_ENDPOINT_URL", ""))
    s3_args = command_args(services.get("seaweedfs", {}))
    s3_port = next((arg.partition("=")[2] for arg in s3_args if arg.startswith("-s3.port=")), "8333")
    if endpoint.hostname != "seaweedfs" or "-s3" not in s3_args or str(endpoint.port) != s3_port:
        problems.append("mlflow: MLFLOW_S3_ENDPOINT_URL is not the seaweedfs service's S3 port")
    if "mlflow:" + option("--port") not in option("--allowed-hosts").split(","):
        problems.append("mlflow: --allowed-hosts does not admit the in-network name the workers use")
    init = services.get("s3-init", {})
    init_args = command_args(init)
    bucket_uri = next((arg for arg in init_args if arg.startswith("s3://")), "")
    init_endpoint = as_dict(init.get("environment")).get("MLFLOW_S3_ENDPOINT_URL")
    if init_args[:4] != ["python", "-m", "pipeline.store.s3", "ensure-bucket"] \
            or urlsplit(bucket_uri).netloc != destination.netloc or init_endpoint != endpoint.geturl():
        problems.append("s3-init does not create the artifacts bucket (ensure-bucket) on the same endpoint")
    return problems


def entrypoint_problems(compose: dict) -> list[str]:
    """Services of the Airflow image keep the official entrypoint, which runs `airflow <args>`
    unless the command starts with `airflow`, `bash` or `python` (so `["airflow-init"]` would run
    `airflow airflow-init`); a service without Airflow's database skips its DB check."""
    problems = []
    for name, service in compose["services"].items():
        if service.get("build", {}).get("dockerfile") != "docker/Dockerfile":
            continue
        if "entrypoint" in service:
            problems.append(f"{name}: replaces the official image's entrypoint")
        args = command_args(service)
        if not args or args[0] not in ("airflow", "bash", "python"):
            problems.append(f"{name}: command {args[:1]} would run as `airflow {' '.join(args[:1])}`")
        env = as_dict(service.get("environment"))
        if "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env and env.get("CONNECTION_CHECK_MAX_COUNT") != "0":
            problems.append(f"{name}: no metadata DB, but the entrypoint waits for one")
    return problems


def non_loopback_ports(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host_ip, host_port, _ = parse_port(port)
            if host_ip != "127.0.0.1":
                problems.append(f"{name}: {port!r} is published beyond 127.0.0.1")
    return problems


def worker_queues(service: dict) -> list[str]:
    """The queues an `airflow celery worker` command consumes (Airflow's default: `default`)."""
    args = command_args(service)
    if args[:3] != ["airflow", "celery", "worker"]:
        return []
    for flag in ("--queues", "-q"):
        if flag in args and args.index(flag) + 1 < len(args):
            return args[args.index(flag) + 1].split(",")
    return ["default"]


def queue_problems(compose: dict) -> list[str]:
    """Every queue of the DAG has a worker; tasks without a queue go to `default`."""
    services, problems = compose["services"], []
    consumed = {q for service in services.values() for q in worker_queues(service)}
    problems += [f"no worker consumes queue {q!r}" for q in QUEUES if q not in consumed]
    for name in sorted(AIRFLOW_SERVICES & set(services)):
        default = as_dict(services[name].get("environment")).get("AIRFLOW__OPERATORS__DEFAULT_QUEUE", "default")
        if default != "default":
            problems.append(f"{name}: default queue is {default!r}, not 'default'")
    return problems


def shared_work_folders(compose: dict) -> list[str]:
    """Workers share no folder for pipeline files: PIPELINE_WORK_DIR on no volume or bind mount (a
    named volume is one folder for every replica of a scaled service). Logs may be shared."""
    problems = []
    for name, service in compose["services"].items():
        work_dir = as_dict(service.get("environment")).get("PIPELINE_WORK_DIR")
        if not work_dir:
            continue
        for source, target in volume_mounts(service):
            if source and (work_dir + "/").startswith(target.rstrip("/") + "/"):
                problems.append(f"{name}: PIPELINE_WORK_DIR {work_dir} is on the shared mount {source}")
    return problems


def scale_blockers(service: dict) -> list[str]:
    """What stops `docker compose up --scale SERVICE=N` from running N copies."""
    problems = [key for key in ("container_name", "hostname") if key in service]
    problems += [f"fixed host port {port!r}" for port in service.get("ports", []) if parse_port(port)[1]]
    return problems


def dockerfile_problems(text: str, airflow_version: str) -> list[str]:
    """The Airflow image: the official Airflow image of the locked version as its base, the hashed
    lock, the project without unlocked dependencies, the dataset, the environment, the official
    image's user and entrypoint kept."""
    problems = list(unpinned_from_lines(text))
    bases = re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", text, re.M)
    if not bases or not re.fullmatch(rf"apache/airflow:{re.escape(airflow_version)}-python3\.1[1-3]", bases[-1]):
        problems.append(f"the base is not the official apache/airflow:{airflow_version}-pythonX.Y image")
    if not re.search(r"^COPY\s+.*\brequirements\.lock\b", text, re.M):
        problems.append("requirements.lock is not copied")
    if not re.search(r"pip install\b[^\n]*--require-hashes[^\n]*-r \S*requirements\.lock\b", text):
        problems.append("requirements.lock is not installed with --require-hashes")
    for command in re.findall(r"pip install\b[^\n]*", text):
        if "--require-hashes" not in command and "--no-deps" not in command:
            problems.append(f"unlocked install: {command.strip()}")
    if not re.search(r"apt-get install\b[^\n]*\bdataset-fashion-mnist\b", text):
        problems.append("dataset-fashion-mnist is not installed")
    for setting in ("TF_USE_LEGACY_KERAS=1", "AIRFLOW__CORE__DAGS_FOLDER="):
        if not re.search(rf"^\s*(ENV\s+)?{re.escape(setting)}", text, re.M):
            problems.append(f"{setting} is not set")
    for folder in ("dags", "pipeline", "plugin"):
        if not re.search(rf"^COPY\s+(--\S+\s+)*{folder}", text, re.M):
            problems.append(f"{folder}/ is not copied")
    if re.search(r"^ENTRYPOINT\b", text, re.M):
        problems.append("the official image's ENTRYPOINT is replaced")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    if not users or users[-1] != "airflow":
        problems.append("the image does not end as the official image's user airflow")
    return problems


def unpinned_from_lines(text: str):
    for image in re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", text, re.M):
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "@sha256:" not in image and (not tag or tag == "latest" or "$" in image):
            yield f"FROM {image} is not pinned"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", re.sub(r"\[.*\]", "", name)).strip().lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (a hashed lock's continuation lines skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip().rstrip("\\").strip()
        if line and not line.startswith("--"):
            name, sep, version = line.partition("==")
            found[canonical(name)] = version.strip() if sep else ""
    return found


def lock_problems(lock_text: str, constraints: dict[str, str]) -> list[str]:
    """A hashed lock: every entry pinned with `==` and hashed, at constraints.txt's version."""
    problems = []
    for entry in re.split(r"\n(?=[A-Za-z0-9])", lock_text):  # one entry per requirement
        requirement = entry.split("\\", 1)[0].split("#", 1)[0].strip()
        if not requirement:
            continue
        name, sep, version = requirement.partition("==")
        if not sep:
            problems.append(f"{requirement}: not pinned with ==")
        elif "--hash=sha256:" not in entry:
            problems.append(f"{requirement}: no hash")
        elif canonical(name) in constraints and constraints[canonical(name)] != version.strip():
            problems.append(f"{requirement}: constraints.txt pins {constraints[canonical(name)]}")
    return problems


def project_requirements(extras: tuple[str, ...] = ()) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [*project["dependencies"], *(r for extra in extras for r in project["optional-dependencies"][extra])]


# ---------------------------------------------------------------------------------------------------
# Tests on the real files, each with a broken copy showing the checker catches the fault


@pytest.fixture(scope="module")
def compose() -> dict:
    return resolved_compose()


def test_expected_services(compose):
    expected = AIRFLOW_SERVICES | ONE_SHOT_SERVICES | {"postgres", "redis", "seaweedfs", "mlflow"}
    assert expected <= set(compose["services"])
    assert {name for name, service in compose["services"].items() if is_one_shot(service)} == ONE_SHOT_SERVICES


def test_every_service_has_image_or_build(compose):
    assert services_without_image_or_build(compose) == []
    broken = copy.deepcopy(compose)
    broken["services"]["redis"].pop("image")
    assert services_without_image_or_build(broken) == ["redis"]


def test_pulled_images_are_pinned(compose):
    assert unpinned_images(compose) == []
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["image"] = "redis:latest"
    broken["services"]["seaweedfs"]["image"] = "chrislusf/seaweedfs"
    assert len(unpinned_images(broken)) == 2


def test_no_image_from_a_repository_that_stopped_publishing(compose):
    assert unpublished_images(compose) == []
    broken = copy.deepcopy(compose)
    broken["services"]["seaweedfs"]["image"] = "minio/minio:RELEASE.2025-09-07T16-13-09Z"
    assert unpublished_images(broken) == [
        "seaweedfs: 'minio/minio:RELEASE.2025-09-07T16-13-09Z' is no longer published"]


@pytest.mark.parametrize("image, expected", [
    ("postgres:16-bookworm", ("registry-1.docker.io", "library/postgres", "16-bookworm")),
    ("chrislusf/seaweedfs:4.47", ("registry-1.docker.io", "chrislusf/seaweedfs", "4.47")),
    ("apache/airflow:3.3.2-python3.11", ("registry-1.docker.io", "apache/airflow", "3.3.2-python3.11")),
    ("redis", ("registry-1.docker.io", "library/redis", "latest")),
    ("ghcr.io/org/app:1.0", ("ghcr.io", "org/app", "1.0")),
    ("localhost:5000/app@sha256:abc", ("localhost:5000", "app", "sha256:abc")),
])
def test_image_references_resolve_as_docker_resolves_them(image, expected):
    assert image_reference(image) == expected


def test_every_pulled_image_is_published(compose):
    """Each image the stack pulls, looked up in Docker Hub; skipped (with the reason) when the
    registry does not answer, e.g. on a machine without internet access."""
    images = pulled_images(compose)
    assert {"postgres:16-bookworm", "redis:7.2-bookworm", "apache/airflow:3.3.2-python3.11"} <= images
    try:
        missing = [image for image in sorted(images) if not published_in_registry(image)]
    except RegistryUnreachable as error:
        pytest.skip(f"Docker Hub's registry API is unreachable from here ({error}): images not checked")
    assert missing == []


def test_every_variable_is_defined_in_env_example():
    env = read_env_file()
    assert undefined_variables(compose_text(), env) == set()
    # A new variable without an entry in .env.example is caught; one with a default or an escaped
    # `$$` is not a reference that needs one.
    text = compose_text() + "\nx-probe: ['${NEW_SECRET}', '$OTHER', '${WITH_DEFAULT:-1}', '$${SHELL_VAR}']\n"
    assert undefined_variables(text, env) == {"NEW_SECRET", "OTHER"}
    env.pop("MLFLOW_BUCKET")
    assert "MLFLOW_BUCKET" in undefined_variables(compose_text(), env)


def test_env_example_is_documented_and_used():
    env = read_env_file()
    assert undocumented_env_lines(ENV_EXAMPLE) == []
    referenced = {name for name, _ in variable_references(compose_text())}
    assert set(env) - referenced == set(), "variables in .env.example that the compose file never uses"
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare.env"
        bare.write_text("# documented\nA=1\nB=2\n")
        assert undocumented_env_lines(bare) == ["B"]


def test_env_example_holds_only_placeholder_secrets():
    env = read_env_file()
    secrets = [name for name in env if SECRET_NAME.search(name)]
    assert len(secrets) >= 7  # database, Airflow and MinIO secrets
    assert secrets_not_placeholders(env) == []
    assert secrets_not_placeholders({**env, "AIRFLOW_JWT_SECRET": "s3cr3t"}) == ["AIRFLOW_JWT_SECRET"]


def test_compose_file_has_no_literal_credentials():
    """Secrets reach the services only through variables: with every variable replaced by a marker,
    each secret setting and each user:password in a URL is made of markers alone."""
    names = {name for name, _ in variable_references(compose_text())}
    marked = interpolate(load_compose(), {name: f"<{name}>" for name in names})
    marker = re.compile(r"(<[A-Z0-9_]+>)+")
    secret_setting = re.compile(r"(PASSWORD|SECRET|FERNET_KEY|ACCESS_KEY)(?!S?_FILE)")
    checked = 0
    for service in marked["services"].values():
        for key, value in as_dict(service.get("environment")).items():
            if secret_setting.search(key):
                assert marker.fullmatch(value), f"{key} holds a literal: {value!r}"
                checked += 1
        for text in [*as_dict(service.get("environment")).values(), *command_args(service)]:
            for user, password in re.findall(r"://([^:@/]*):([^@/]*)@", text):
                assert marker.fullmatch(user) and marker.fullmatch(password), text
                checked += 1
    assert checked >= 10
    assert not marker.fullmatch("s3cr3t")


def test_long_running_services_have_healthchecks(compose):
    assert long_running_without_healthcheck(compose) == []
    broken = copy.deepcopy(compose)
    broken["services"]["mlflow"].pop("healthcheck")
    broken["services"]["airflow-worker"]["healthcheck"] = {"disable": True}
    assert sorted(long_running_without_healthcheck(broken)) == ["airflow-worker", "mlflow"]


def test_dependencies_wait_for_health_or_success(compose):
    assert dependency_problems(compose) == []
    services = compose["services"]
    assert services["airflow-scheduler"]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    assert services["mlflow"]["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    broken = copy.deepcopy(compose)
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_started"
    broken["services"]["redis"]["depends_on"] = ["postgres"]
    assert len(dependency_problems(broken)) == 2


def test_named_volumes_are_declared(compose):
    assert undeclared_named_volumes(compose) == []
    broken = copy.deepcopy(compose)
    broken["volumes"].pop("seaweedfs-data")
    broken["services"]["redis"]["volumes"] = ["redis-data:/data", "./local:/local"]
    assert len(undeclared_named_volumes(broken)) == 2


def test_celery_executor_broker_and_databases(compose):
    assert connection_problems(compose) == []
    broken = copy.deepcopy(compose)
    env = broken["services"]["airflow-worker"]["environment"]
    env["AIRFLOW__CORE__EXECUTOR"] = "LocalExecutor"
    env["AIRFLOW__CELERY__BROKER_URL"] = "redis://broker:6379/0"
    env["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+postgresql://u:p@localhost/airflow"
    broken["services"]["airflow-scheduler"]["environment"]["AIRFLOW__CELERY__BROKER_URL"] = "redis://redis:6380/0"
    problems = connection_problems(broken)
    assert any("executor" in p for p in problems)
    assert any("broker host 'broker'" in p for p in problems)
    assert any("broker port 6380" in p for p in problems)
    assert any("RESULT_BACKEND is not on the postgres service" in p for p in problems)


def test_airflow_containers_share_code_but_no_work_folder(compose):
    """Same dags/ and plugins/ as the repository everywhere; each container its own work folder."""
    for name in AIRFLOW_SERVICES:
        service = compose["services"][name]
        mounts = {target: source for source, target in volume_mounts(service)}
        assert (DOCKER / mounts["/opt/airflow/dags"]).resolve() == ROOT / "dags", name
        assert (ROOT / "dags" / "model_compression.py").is_file()
        assert (DOCKER / mounts["/opt/airflow/plugins"]).resolve() == ROOT / "plugins", name
        assert as_dict(service["environment"])["PIPELINE_WORK_DIR"], name
    assert shared_work_folders(compose) == []
    dags_folder = re.search(r"AIRFLOW__CORE__DAGS_FOLDER=(\S+)", DOCKERFILE.read_text()).group(1)
    assert dags_folder == "/opt/airflow/dags"
    broken = copy.deepcopy(compose)
    broken["services"]["airflow-worker"]["volumes"].append("pipeline-work:/opt/airflow/work")
    broken["services"]["airflow-worker-training"]["volumes"].append("../.work:/opt/airflow")
    assert len(shared_work_folders(broken)) == 2


def test_workers_consume_the_dags_queues(compose):
    assert queue_problems(compose) == []
    assert {name: worker_queues(compose["services"][name]) for name in WORKER_SERVICES} == \
        {name: [queue] for name, queue in WORKER_SERVICES.items()}
    broken = copy.deepcopy(compose)
    broken["services"]["airflow-worker-training"]["command"] = ["airflow", "celery", "worker"]
    broken["services"]["airflow-scheduler"]["environment"]["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] = "cpu"
    assert queue_problems(broken) == ["no worker consumes queue 'training'",
                                      "airflow-scheduler: default queue is 'cpu', not 'default'"]


def test_mlflow_server_uses_postgres_and_s3(compose):
    assert mlflow_problems(compose) == []
    assert compose["services"]["mlflow"]["build"]["dockerfile"] == "docker/mlflow/Dockerfile"
    broken = copy.deepcopy(compose)
    args = broken["services"]["mlflow"]["command"]
    args[args.index("--artifacts-destination") + 1] = "/mlartifacts"
    args[args.index("--backend-store-uri") + 1] = "sqlite:///mlflow.db"
    assert len(mlflow_problems(broken)) == 3  # destination, store, and the bucket no longer matches


def test_airflow_image_services_keep_the_official_entrypoint(compose):
    assert entrypoint_problems(compose) == []
    assert command_args(compose["services"]["airflow-init"])[0] == "bash"
    broken = copy.deepcopy(compose)
    broken["services"]["airflow-init"]["command"] = ["airflow-init"]
    broken["services"]["s3-init"]["environment"].pop("CONNECTION_CHECK_MAX_COUNT")
    broken["services"]["airflow-scheduler"]["entrypoint"] = ["airflow"]
    assert sorted(entrypoint_problems(broken)) == [
        "airflow-init: command ['airflow-init'] would run as `airflow airflow-init`",
        "airflow-scheduler: replaces the official image's entrypoint",
        "s3-init: no metadata DB, but the entrypoint waits for one"]


def test_published_ports_are_loopback_only(compose):
    assert non_loopback_ports(compose) == []
    published = {name: [parse_port(p)[2] for p in service.get("ports", [])]
                 for name, service in compose["services"].items() if service.get("ports")}
    assert published == {"airflow-apiserver": ["8080"], "mlflow": ["5000"]}
    broken = copy.deepcopy(compose)
    broken["services"]["mlflow"]["ports"] = ["5000:5000", {"target": 5000, "published": 5000}]
    broken["services"]["redis"]["ports"] = ["0.0.0.0:6379:6379"]
    assert len(non_loopback_ports(broken)) == 3


def test_workers_are_scalable(compose):
    for name in WORKER_SERVICES:
        assert scale_blockers(compose["services"][name]) == [], name
    worker = compose["services"]["airflow-worker"]
    assert scale_blockers({**worker, "container_name": "worker", "ports": ["127.0.0.1:8793:8793", "8793"]}) == [
        "container_name", "fixed host port '127.0.0.1:8793:8793'"]


def test_airflow_dockerfile():
    airflow = pins(CONSTRAINTS)["apache-airflow"]
    good = DOCKERFILE.read_text()
    assert dockerfile_problems(good, airflow) == []
    base = f"FROM apache/airflow:{airflow}-python3.11"
    assert dockerfile_problems(good.replace(base, "FROM apache/airflow:latest"), airflow) == [
        "FROM apache/airflow:latest is not pinned",
        f"the base is not the official apache/airflow:{airflow}-pythonX.Y image"]
    assert dockerfile_problems(good.replace(base, "FROM python:3.11-slim-bookworm"), airflow) == [
        f"the base is not the official apache/airflow:{airflow}-pythonX.Y image"]
    assert dockerfile_problems(good, "3.3.1") == ["the base is not the official apache/airflow:3.3.1-pythonX.Y image"]
    unhashed = good.replace("--require-hashes ", "")
    assert dockerfile_problems(unhashed, airflow) == [
        "requirements.lock is not installed with --require-hashes",
        "unlocked install: pip install --no-cache-dir -r /tmp/requirements.lock"]
    assert dockerfile_problems(good + "USER root\n", airflow) == [
        "the image does not end as the official image's user airflow"]
    assert dockerfile_problems(good + 'ENTRYPOINT ["airflow"]\n', airflow) == [
        "the official image's ENTRYPOINT is replaced"]


def test_locks_hold_constraints_pins_with_hashes():
    """requirements.lock (the Airflow image) and docker/mlflow/requirements.lock: every package
    pinned and hashed, at constraints.txt's version, and every requirement of the package and
    its `airflow` extra in the Airflow image's lock."""
    constraints = pins(CONSTRAINTS)
    for lock in (LOCK, MLFLOW_LOCK):
        assert lock_problems(lock.read_text(), constraints) == [], lock
    locked = pins(LOCK)
    wanted = {canonical(re.split(r"[<>=!~;\s]", r, maxsplit=1)[0]) for r in project_requirements(("airflow",))}
    assert wanted - set(locked) == set()
    assert locked["apache-airflow"] == constraints["apache-airflow"]
    assert {"mlflow", "boto3", "psycopg2-binary", "psycopg"} <= set(pins(MLFLOW_LOCK))
    assert not set(pins(MLFLOW_LOCK)) & {"tensorflow", "apache-airflow"}, "the MLflow image stays small"
    broken = "numpy==2.4.5 \\\n    --hash=sha256:00\npandas==3.1.1\nscipy>=1\n"
    assert lock_problems(broken, constraints) == ["numpy==2.4.5: constraints.txt pins 2.4.6",
                                                  "pandas==3.1.1: no hash", "scipy>=1: not pinned with =="]


def test_mlflow_dockerfile_installs_its_lock_with_hashes():
    text = MLFLOW_DOCKERFILE.read_text()
    assert list(unpinned_from_lines(text)) == []
    assert re.search(r"^USER\s+(?!root\b|0\b)\S+", text, re.M)
    assert re.search(r"^COPY\s+docker/mlflow/requirements\.lock\s", text, re.M)
    assert re.findall(r"pip install\b[^\n&]*", text) == ["pip install --require-hashes -r /tmp/requirements.lock "]


def test_celery_extra_keeps_the_provider_working():
    """The `airflow` extra (the Celery executor the image runs) caps celery below 5.7 and leaves
    the runtime stack to [project.dependencies]."""
    extra = {canonical(re.split(r"[<>=!~;\s]", r, maxsplit=1)[0]): r for r in project_requirements(("airflow",))
             if r not in project_requirements()}
    assert {"apache-airflow", "apache-airflow-providers-celery", "celery", "redis", "psycopg2-binary",
            "asyncpg", "psycopg"} <= set(extra)
    assert "<5.7" in extra["celery"], "celery 5.7 breaks the provider (see pyproject.toml's comment)"
    assert constraints_version("celery").startswith("5.6.")
    runtime = {canonical(re.split(r"[<>=!~;\s]", r, maxsplit=1)[0]) for r in project_requirements()}
    assert "apache-airflow" not in runtime, "compress() must install without Airflow"


def constraints_version(name: str) -> str:
    return pins(CONSTRAINTS)[canonical(name)]


def test_postgres_creates_both_databases_on_first_start(compose):
    postgres = compose["services"]["postgres"]
    mounts = dict(volume_mounts(postgres))
    init_sources = [source for source, target in volume_mounts(postgres)
                    if target.startswith("/docker-entrypoint-initdb.d/")]
    assert [(DOCKER / source).resolve() for source in init_sources] == [INIT_DB_SQL]
    assert mounts["postgres-data"] == "/var/lib/postgresql/data"
    env = as_dict(postgres["environment"])
    for name in re.findall(r"\\getenv \w+ (\w+)", INIT_DB_SQL.read_text()):
        assert env.get(name), f"init-db.sql reads {name}, which the postgres service does not set"
    assert re.findall(r"CREATE DATABASE (\w+)", INIT_DB_SQL.read_text()) == ["airflow", "mlflow"]


def _postgres_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


@pytest.mark.pipeline  # a throwaway PostgreSQL server process; make test-stack
@pytest.mark.skipif(_postgres_bin() is None or shutil.which("psql") is None, reason="no PostgreSQL server here")
def test_init_db_sql_runs_on_a_real_server():
    """The init script against a throwaway PostgreSQL cluster, as the image's entrypoint runs it."""
    bin_dir = _postgres_bin()
    as_user: list[str] = []
    # Directly under the system temp folder: pytest's tmp_path sits in a folder private to this user.
    workdir = Path(tempfile.mkdtemp(prefix="init-db-test-"))
    try:
        if os.geteuid() == 0:  # initdb refuses to run as root
            if shutil.which("runuser") is None:
                pytest.skip("running as root without runuser")
            as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(workdir, "postgres")
        _run_init_db_sql(bin_dir, workdir, as_user)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_init_db_sql(bin_dir: Path, workdir: Path, as_user: list[str]) -> None:
    data, sock = workdir / "data", str(workdir)
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "admin"], **run)
    port = "55432"  # names the unix socket only: the server listens on no TCP address
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(workdir / "log"),
                    "-o", f"-k {sock} -c listen_addresses='' -p {port}", "start"], **run)
    try:
        psql = [*as_user, "env", "AIRFLOW_DB_USER=airflow", "AIRFLOW_DB_PASSWORD=it's \"quoted\"",
                "MLFLOW_DB_USER=ml-flow", "MLFLOW_DB_PASSWORD=x",
                "psql", "-v", "ON_ERROR_STOP=1", "--no-psqlrc", "-h", sock, "-p", port, "-U", "admin"]
        script = workdir / "init-db.sql"
        script.write_text(INIT_DB_SQL.read_text())
        script.chmod(0o644)
        subprocess.run([*psql, "-d", "postgres", "-f", str(script)], **run)
        owners = subprocess.run([*psql, "-d", "postgres", "-Atc",
                                 "select datname || '=' || pg_get_userbyid(datdba) from pg_database "
                                 "where datname in ('airflow', 'mlflow') order by 1"], **run).stdout.split()
        assert owners == ["airflow=airflow", "mlflow=ml-flow"]
        # Without its variables the script stops at its first statement instead of running on.
        failed = subprocess.run([*as_user, "psql", "-v", "ON_ERROR_STOP=1", "--no-psqlrc", "-h", sock, "-p", port,
                                 "-U", "admin", "-d", "airflow", "-f", str(script)],
                                capture_output=True, text=True, timeout=60)
        assert failed.returncode != 0 and "syntax error" in failed.stderr
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-m", "fast", "stop"],
                       capture_output=True, timeout=60)


def _fake_airflow_bin(tmp_path: Path) -> Path:
    """A PATH folder whose `airflow` only records its arguments, and whose `python` is this one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "airflow").write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/airflow-calls"\n')
    (bin_dir / "airflow").chmod(0o755)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return bin_dir


def test_airflow_init_refuses_placeholders_and_writes_the_admin_password(tmp_path):
    from cryptography.fernet import Fernet

    bin_dir = _fake_airflow_bin(tmp_path)
    passwords = tmp_path / "auth" / "passwords.json"
    passwords.parent.mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
           "AIRFLOW_ADMIN_USERNAME": "admin", "AIRFLOW_ADMIN_PASSWORD": 'pa"ss'}

    def init(**overrides):
        return subprocess.run(["bash", str(AIRFLOW_INIT)], env={**env, **overrides},
                              capture_output=True, text=True, timeout=120)

    placeholder = init(AIRFLOW__API_AUTH__JWT_SECRET="change-me-jwt-secret")
    assert placeholder.returncode == 1 and "AIRFLOW__API_AUTH__JWT_SECRET" in placeholder.stderr
    bad_key = init(AIRFLOW__CORE__FERNET_KEY="not-a-key")
    assert bad_key.returncode != 0 and "not a Fernet key" in bad_key.stderr
    assert not (tmp_path / "airflow-calls").exists(), "nothing may be migrated before the checks pass"

    done = init()
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "airflow-calls").read_text().split("\n")[0] == "db migrate"
    assert json.loads(passwords.read_text()) == {"admin": 'pa"ss'}
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o600


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_make_env_replaces_every_placeholder(tmp_path):
    from cryptography.fernet import Fernet

    out = tmp_path / ".env"
    subprocess.run(["sh", str(MAKE_ENV), str(out)], check=True, capture_output=True, timeout=60)
    generated, example = read_env_file(out), read_env_file()
    assert set(generated) == set(example)
    assert not any("change-me" in value for value in generated.values())
    assert sorted(secrets_not_placeholders(generated)) == sorted(name for name in example if SECRET_NAME.search(name))
    assert all(re.fullmatch(r"[0-9a-f]{48}", generated[name]) for name in generated
               if "PASSWORD" in name or "SECRET" in name)
    Fernet(generated["AIRFLOW_FERNET_KEY"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # The values the compose file interpolates stay valid URLs with the generated secrets.
    assert connection_problems(interpolate(load_compose(), generated)) == []
    again = subprocess.run(["sh", str(MAKE_ENV), str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "not overwriting" in again.stderr


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _docker_compose_available(),
                    reason="`docker compose` is not available here (no compose plugin for the docker client)")
def test_docker_compose_config_accepts_the_file():
    """`docker compose config` resolves and validates the file client-side (no engine needed)."""
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE),
                             "config", "-q"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
