"""The compose file and Dockerfiles are the production topology; mistakes there show only at deploy.

These tests read docker-compose.yml and the Dockerfiles as data and check the promises the
deployment relies on: start order, health, the GPU reservation, the shared settings and volumes,
non-root images and a worker that runs one task at a time on the ``gpu`` queue.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

SERVICES = ("postgres", "redis", "migrate", "api", "worker")
LONG_RUNNING = ("postgres", "redis", "api", "worker")
APP_SERVICES = ("migrate", "api", "worker")
SHARED_SETTINGS = ("ANTIDOTE_DATABASE_URL", "ANTIDOTE_BROKER_URL")

Service = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Reading compose and Dockerfiles
# ---------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One ``FROM`` stage of a Dockerfile: its base, its alias and its instructions in order."""

    base: str
    alias: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        """Arguments of every ``keyword`` instruction in this stage, in order."""
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Split a Dockerfile into stages, joining continuation lines and dropping comments."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)

    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = [word for word in rest.split() if not word.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=words[0], alias=alias))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        else:
            assert keyword == "ARG", f"{path.name}: {keyword} before the first FROM"
    assert stages, f"{path.name} has no FROM"
    return stages


def final_lineage(stages: list[Stage]) -> list[Stage]:
    """The final stage followed by the earlier stages it is built on, nearest first."""
    chain = [stages[-1]]
    earlier = list(enumerate(stages[:-1]))
    while True:
        base = chain[-1].base.lower()
        parents = [(i, s) for i, s in earlier if s.alias and s.alias.lower() == base]
        if not parents:
            return chain
        index, parent = parents[-1]
        chain.append(parent)
        earlier = earlier[:index]


def final_value(stages: list[Stage], keyword: str) -> str | None:
    """The last ``keyword`` in effect in the final image, inherited from parent stages."""
    for stage in final_lineage(stages):
        found = stage.values(keyword)
        if found:
            return found[-1]
    return None


def argv(value: str | list[str]) -> list[str]:
    """A command as an argument list, from exec form (JSON or YAML list) or shell form."""
    if isinstance(value, list):
        return [str(part) for part in value]
    value = value.strip()
    if value.startswith("["):
        parsed = json.loads(value)
        assert isinstance(parsed, list)
        return [str(part) for part in parsed]
    return shlex.split(value)


def option_values(args: list[str], *names: str) -> list[str]:
    """Values of any of ``names``, written ``-Q gpu``, ``--queues gpu`` or ``--queues=gpu``."""
    values: list[str] = []
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                values.append(args[i + 1])
            elif name.startswith("--") and arg.startswith(name + "="):
                values.append(arg.split("=", 1)[1])
    return values


def dockerfile_of(service: Service) -> Path:
    """The Dockerfile a service builds from, resolved against its build context."""
    build = service["build"]
    if isinstance(build, str):
        return ROOT / build / "Dockerfile"
    return ROOT / str(build.get("context", ".")) / str(build.get("dockerfile", "Dockerfile"))


def environment(service: Service) -> dict[str, str]:
    """A service's environment as a mapping, from either the mapping or the list syntax."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {key: value for key, _, value in (str(item).partition("=") for item in env)}
    return {str(key): str(value) for key, value in env.items()}


def conditions(service: Service) -> dict[str, str]:
    """``depends_on`` as service -> condition; the short list form means ``service_started``."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def mounts(service: Service) -> dict[str, str]:
    """Volume mounts as container path -> source, from the short or the long syntax."""
    result: dict[str, str] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            result[str(volume["target"])] = str(volume.get("source", ""))
        else:
            source, _, rest = str(volume).partition(":")
            result[rest.split(":")[0]] = source
    return result


def published_ports(service: Service) -> set[tuple[str, str]]:
    """Ports as (published, container) pairs, from the short or the long syntax."""
    pairs: set[tuple[str, str]] = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            pairs.add((str(port.get("published", "")), str(port["target"])))
        else:
            parts = str(port).split("/")[0].rsplit(":", 2)
            pairs.add((parts[-2] if len(parts) >= 2 else "", parts[-1]))
    return pairs


def command_of(service: Service) -> list[str]:
    """What a service runs: its compose ``command``, else its image's final ``CMD``."""
    if "command" in service:
        return argv(service["command"])
    cmd = final_value(parse_dockerfile(dockerfile_of(service)), "CMD")
    assert cmd is not None, "neither compose nor the Dockerfile says what to run"
    return argv(cmd)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


# ---------------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------------


def test_compose_spec_without_version(compose: dict[str, Any]) -> None:
    """The compose spec dropped ``version:``; current docker compose warns when it is there."""
    assert "version" not in compose


def test_services_and_images(services: dict[str, Service]) -> None:
    """Every piece of the deployment is present, and images are pinned to a major version."""
    assert set(SERVICES) <= set(services)
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    assert services["api"]["image"] == "clip-antidote-api:latest"
    assert services["worker"]["image"] == "clip-antidote-worker:latest"


def test_migrate_uses_the_api_image(services: dict[str, Service]) -> None:
    """Migrations must come from the same build as the API, or schema and code can disagree."""
    migrate, api = services["migrate"], services["api"]
    assert migrate["image"] == api["image"]
    assert dockerfile_of(migrate) == dockerfile_of(api)
    assert command_of(migrate) == ["antidote", "db", "upgrade"]
    assert conditions(migrate) == {"postgres": "service_healthy"}
    # A one-shot job; an unquoted ``no`` would load as False, which compose rejects.
    assert migrate["restart"] == "no"


def test_api_publishes_8000(services: dict[str, Service]) -> None:
    """Clients reach the API on port 8000 of the host, and uvicorn listens on 8000 inside."""
    api = services["api"]
    assert ("8000", "8000") in published_ports(api)
    args = command_of(api)
    assert args[:2] == ["antidote", "serve"]
    assert "--api-only" in args
    assert option_values(args, "--host") == ["0.0.0.0"]
    assert option_values(args, "--port") == ["8000"]


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_healthchecks(services: dict[str, Service], name: str) -> None:
    """``service_healthy`` conditions and restarts depend on a real health probe."""
    check = services[name].get("healthcheck")
    assert isinstance(check, dict), f"{name} has no healthcheck"
    assert not check.get("disable", False)
    test = check.get("test")
    assert test, f"{name}'s healthcheck has no test"
    if isinstance(test, list):
        assert test[0] in {"CMD", "CMD-SHELL"}, f"{name}'s healthcheck is {test[0]}"
        assert len(test) > 1


def test_api_healthcheck_probes_livez(services: dict[str, Service]) -> None:
    """Liveness must not depend on the database, so that a DB outage does not restart the API."""
    test = " ".join(argv(services["api"]["healthcheck"]["test"]))
    assert "http://127.0.0.1:8000/livez" in test


@pytest.mark.parametrize("name", ["api", "worker"])
def test_start_order(services: dict[str, Service], name: str) -> None:
    """API and worker start only on healthy stores and a migrated schema."""
    deps = conditions(services[name])
    assert deps.get("postgres") == "service_healthy"
    assert deps.get("redis") == "service_healthy"
    assert deps.get("migrate") == "service_completed_successfully"


def test_worker_reserves_an_nvidia_gpu(services: dict[str, Service]) -> None:
    """Without a device reservation the worker container sees no GPU at all."""
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    gpus = [
        d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
    ]
    assert len(gpus) == 1
    assert gpus[0].get("count") == 1 or len(gpus[0].get("device_ids", [])) == 1


def test_worker_runs_one_task_at_a_time_on_gpu(services: dict[str, Service]) -> None:
    """One prefork child per GPU: two purifications on one device would run out of memory."""
    args = command_of(services["worker"])
    assert args[0] == "celery"
    assert option_values(args, "-A", "--app") == ["worker.celery_app"]
    assert "worker" in args
    queues = [q for value in option_values(args, "-Q", "--queues") for q in value.split(",")]
    assert queues == ["gpu"]
    assert option_values(args, "-c", "--concurrency") == ["1"]
    assert option_values(args, "-P", "--pool") == ["prefork"]


def test_worker_healthcheck_pings_its_own_node(services: dict[str, Service]) -> None:
    """The probe must name the worker's node, or it pings nobody and always fails."""
    worker = services["worker"]
    node = option_values(command_of(worker), "-n", "--hostname")
    assert len(node) == 1
    probe = argv(worker["healthcheck"]["test"])
    assert probe[0] == "CMD-SHELL", "the node name needs the shell to expand $HOSTNAME"
    probe_args = shlex.split(probe[1])
    assert probe_args[:4] == ["celery", "-A", "worker.celery_app", "inspect"]
    assert "ping" in probe_args
    destination = option_values(probe_args, "-d", "--destination")
    assert len(destination) == 1
    # %h is the container's hostname; compose turns $$ into $ for the shell.
    assert node[0].split("@")[0] == destination[0].split("@")[0]
    assert node[0].endswith("@%h")
    assert destination[0].endswith("@$$HOSTNAME")


def test_shared_settings_come_from_one_anchor(
    compose: dict[str, Any], services: dict[str, Service]
) -> None:
    """API, migrations and worker must talk to the same database and broker."""
    anchor = {str(k): str(v) for k, v in compose["x-antidote-env"].items()}
    envs = {name: environment(services[name]) for name in APP_SERVICES}
    for key in SHARED_SETTINGS:
        assert envs["api"][key] == envs["worker"][key] == anchor[key]
    assert envs["migrate"]["ANTIDOTE_DATABASE_URL"] == anchor["ANTIDOTE_DATABASE_URL"]


def test_urls_point_at_the_compose_stores(
    compose: dict[str, Any], services: dict[str, Service]
) -> None:
    """The URLs must name the compose services and the credentials postgres is started with."""
    env = compose["x-antidote-env"]
    database = urlsplit(env["ANTIDOTE_DATABASE_URL"])
    postgres = environment(services["postgres"])
    assert database.scheme == "postgresql+psycopg"
    assert database.hostname == "postgres"
    assert database.username == postgres["POSTGRES_USER"]
    assert database.password == postgres["POSTGRES_PASSWORD"]
    assert database.path.lstrip("/") == postgres["POSTGRES_DB"]
    broker = urlsplit(env["ANTIDOTE_BROKER_URL"])
    assert broker.scheme == "redis"
    assert broker.hostname == "redis"


def test_api_and_worker_share_the_blob_volume(
    compose: dict[str, Any], services: dict[str, Service]
) -> None:
    """Uploads written by the API are read by the worker, so both mount the same data dir."""
    data_dir = compose["x-antidote-env"]["ANTIDOTE_DATA_DIR"]
    assert mounts(services["api"]).get(data_dir) == "blobs"
    assert mounts(services["worker"]).get(data_dir) == "blobs"


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Service]) -> None:
    """State lives in named volumes; an undeclared one makes compose refuse the file."""
    declared = set(compose.get("volumes") or {})
    assert {"pgdata", "redisdata", "blobs"} <= declared
    assert mounts(services["postgres"]).get("/var/lib/postgresql/data") == "pgdata"
    assert mounts(services["redis"]).get("/data") == "redisdata"
    for name, service in services.items():
        for source in mounts(service).values():
            if source and not source.startswith(("/", ".", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"


# ---------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", APP_SERVICES)
def test_dockerfiles_exist(services: dict[str, Service], name: str) -> None:
    """A build that names a missing Dockerfile fails only when someone deploys."""
    assert dockerfile_of(services[name]).is_file()


@pytest.mark.parametrize("name", ["api", "worker"])
def test_images_run_as_non_root(services: dict[str, Service], name: str) -> None:
    """The services parse untrusted uploads; a container escape should not start as root."""
    user = final_value(parse_dockerfile(dockerfile_of(services[name])), "USER")
    assert user is not None, f"the {name} image runs as root"
    assert user.split(":")[0] not in {"root", "0"}


def test_worker_image_is_cuda_runtime(services: dict[str, Service]) -> None:
    """The worker needs the CUDA runtime libraries, not a devel image's compilers."""
    stages = parse_dockerfile(dockerfile_of(services["worker"]))
    base = final_lineage(stages)[-1].base
    image, _, tag = base.partition(":")
    assert image == "nvidia/cuda"
    assert "runtime" in tag


def test_image_defaults_match_compose(services: dict[str, Service]) -> None:
    """``docker run`` of either image alone must behave as the compose service does."""
    api_stages = parse_dockerfile(dockerfile_of(services["api"]))
    api_cmd = final_value(api_stages, "CMD")
    assert api_cmd is not None
    assert argv(api_cmd) == command_of(services["api"])
    assert final_value(api_stages, "EXPOSE") == "8000"
    healthcheck = final_value(api_stages, "HEALTHCHECK")
    assert healthcheck is not None
    assert "http://127.0.0.1:8000/livez" in healthcheck
    for name in ("api", "worker"):
        env = " ".join(
            value
            for stage in final_lineage(parse_dockerfile(dockerfile_of(services[name])))
            for value in stage.values("ENV")
        )
        assert "HF_HUB_OFFLINE=1" in env
        assert "ANTIDOTE_DATA_DIR=/data" in env


def test_dockerignore_keeps_local_state_out() -> None:
    """The venv, git history and local state would bloat the context and leak into images."""
    ignored = {
        line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
    }
    assert {".venv", ".git", "var"} <= ignored


# ---------------------------------------------------------------------------------------------
# docker compose itself
# ---------------------------------------------------------------------------------------------


def test_docker_compose_accepts_the_file() -> None:
    """Compose's own validator catches what a structural check cannot (unknown keys, types)."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed, so `docker compose config` cannot validate the file")
    version = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=10, check=False
    )
    if version.returncode != 0:
        pytest.skip("the docker compose plugin is not installed (`docker compose version` failed)")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
