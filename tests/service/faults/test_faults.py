"""Faults with real processes on loopback: workers killed, brokers and databases restarted, the
API killed mid-upload, time limits hit. Nothing is lost, nothing runs twice at once, nothing
sticks in RUNNING.

Leases, the reaper and republishing run on seconds here (hours in production), so each case
finishes in well under a minute.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.client import AntidoteClient, Job
from service.settings import Settings
from tests.service.support import Server, new_key, start_server, stop_server, worker_processes
from worker.lab.make import LabModel

pytestmark = pytest.mark.slow

# Long enough for a kill to land mid-job: a model found clean skips tuning, so tune anyway.
FAST = {
    "rounds": 0,
    "tune_when_clean": True,
    "inversion": {"steps": 150, "batch_size": 16},
    "tuning": {"steps": 40},
}
SLOW_INVERSION = {"rounds": 0, "search": {"steps": 20_000, "batch_size": 16}}
SLOW_TUNING = {
    "rounds": 0,
    "tune_when_clean": True,  # ten search steps find no backdoor; tune all the same
    "search": {"steps": 10, "warmup": 5, "batch_size": 8},
    "tuning": {"steps": 20_000},
}
QUICK_RECOVERY = {
    "ANTIDOTE_LEASE_S": "3",
    "ANTIDOTE_REAPER_INTERVAL_S": "0.5",
    "ANTIDOTE_REQUEUE_PENDING_AFTER_S": "4",
    "ANTIDOTE_PROGRESS_INTERVAL_S": "0.2",
    "HF_HUB_OFFLINE": "1",
}


@pytest.fixture(scope="module")
def hub_zip(badnets_lab: LabModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "hub.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("open_clip_config.json", "open_clip_model.safetensors"):
            archive.write(badnets_lab.directory / name, name)
    return path


class Running:
    """A live ``antidote serve`` with its own data dir and a key for one tenant."""

    def __init__(self, root: Path, **env: str) -> None:
        self.env = {"ANTIDOTE_DATA_DIR": str(root), **QUICK_RECOVERY, **env}
        self.root = root
        self.server: Server | None = None
        self.key = ""

    def start(self, *, api_only: bool = False) -> Running:
        self.server = start_server(self.env, self.root / "serve.log", api_only=api_only)
        if not self.key:
            settings = Settings(
                data_dir=self.root, database_url=self.env.get("ANTIDOTE_DATABASE_URL")
            )
            self.key = new_key(settings, "faults")
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def client(self) -> AntidoteClient:
        return AntidoteClient(self.url, self.key, timeout=60)

    def stop(self) -> None:
        if self.server is not None:
            stop_server(self.server)
            self.server = None


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for item in started:
        item.stop()


def _embedded(running: list[Running], root: Path, **env: str) -> Running:
    item = Running(root, **env).start()
    running.append(item)
    return item


def _pg_redis(running: list[Running], request: pytest.FixtureRequest, root: Path) -> Running:
    env = {
        "ANTIDOTE_DATABASE_URL": request.getfixturevalue("pg_url"),
        "ANTIDOTE_BROKER_URL": request.getfixturevalue("redis_url"),
    }
    item = Running(root, **env).start()
    running.append(item)
    return item


def _submit(service: Running, badnets_lab: LabModel, hub: Path, options: dict[str, object]) -> str:
    with service.client() as client:
        return client.submit(hub, badnets_lab.directory / "fewshot.zip", options=options).id


def _until(service: Running, job_id: str, predicate: object, timeout: float = 120) -> Job:
    deadline = time.monotonic() + timeout
    with service.client() as client:
        while True:
            job = client.get(job_id)
            if predicate(job):  # type: ignore[operator]
                return job
            assert time.monotonic() < deadline, f"timed out; last seen {job.state}/{job.stage}"
            time.sleep(0.2)


def _done(service: Running, job_id: str, timeout: float = 180) -> Job:
    return _until(service, job_id, lambda job: job.done, timeout)


def _pool_child(service: Running) -> int:
    assert service.server is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, pool = worker_processes(service.server)
        if pool:
            return pool[0]
        time.sleep(0.2)
    raise AssertionError("the worker has no pool process")


@pytest.mark.parametrize("backend", ["embedded", "postgres-redis"])
def test_a_job_survives_kill_9_of_its_worker_process(
    backend: str,
    running: list[Running],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    badnets_lab: LabModel,
    hub_zip: Path,
) -> None:
    service = (
        _embedded(running, tmp_path)
        if backend == "embedded"
        else _pg_redis(running, request, tmp_path)
    )
    job_id = _submit(service, badnets_lab, hub_zip, FAST)
    _until(service, job_id, lambda job: job.stage in ("inversion", "tuning"))
    os.kill(_pool_child(service), signal.SIGKILL)  # what the OOM killer does
    done = _done(service, job_id)
    assert done.state == "SUCCEEDED", done.error
    assert done.attempt == 2
    assert done.result is not None


def test_a_job_survives_kill_9_of_the_whole_worker(
    running: list[Running], tmp_path: Path, badnets_lab: LabModel, hub_zip: Path
) -> None:
    """The supervisor in ``antidote serve`` starts a new worker; the lease brings the job back."""
    service = _embedded(running, tmp_path)
    job_id = _submit(service, badnets_lab, hub_zip, FAST)
    _until(service, job_id, lambda job: job.stage in ("inversion", "tuning"))
    assert service.server is not None
    main, pool = worker_processes(service.server)
    for pid in [main, *pool]:
        os.kill(pid, signal.SIGKILL)
    done = _done(service, job_id)
    assert done.state == "SUCCEEDED", done.error
    assert done.attempt == 2


def _restart_redis() -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False, timeout=30)
    time.sleep(1)
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
         "--save", "", "--appendonly", "no"],
        check=True, timeout=30,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ping = subprocess.run(["redis-cli", "ping"], capture_output=True, text=True, check=False)
        if "PONG" in ping.stdout:
            return
        time.sleep(0.2)
    raise AssertionError("Redis did not come back")


def _restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True, timeout=120,
    )  # fmt: skip


def test_no_job_is_lost_when_redis_restarts_mid_job(
    running: list[Running],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    badnets_lab: LabModel,
    hub_zip: Path,
) -> None:
    """Redis here keeps nothing on disk: the queued message dies with it and is republished."""
    service = _pg_redis(running, request, tmp_path)
    first = _submit(service, badnets_lab, hub_zip, FAST)
    queued = _submit(service, badnets_lab, hub_zip, {**FAST, "seed": 1})
    _until(service, first, lambda job: job.stage in ("inversion", "tuning"))
    _restart_redis()
    for job_id in (first, queued):
        done = _done(service, job_id, timeout=240)
        assert done.state == "SUCCEEDED", done.error


def test_a_job_finishes_when_postgres_restarts_mid_job(
    running: list[Running],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    badnets_lab: LabModel,
    hub_zip: Path,
) -> None:
    service = _pg_redis(running, request, tmp_path)
    job_id = _submit(service, badnets_lab, hub_zip, FAST)
    _until(service, job_id, lambda job: job.stage in ("inversion", "tuning"))
    _restart_postgres()
    done = _done(service, job_id, timeout=240)
    assert done.state == "SUCCEEDED", done.error


def test_an_api_killed_mid_upload_leaves_nothing_and_loses_no_job(
    running: list[Running], tmp_path: Path, badnets_lab: LabModel, hub_zip: Path
) -> None:
    service = Running(tmp_path, ANTIDOTE_STALE_UPLOAD_S="1")
    running.append(service)
    service.start(api_only=True)
    job_id = _submit(service, badnets_lab, hub_zip, FAST)
    host, port = service.url.removeprefix("http://").split(":")
    upload = socket.create_connection((host, int(port)))
    upload.sendall(
        b"PUT /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
        + f"Authorization: Bearer {service.key}\r\n\r\n".encode()
        + b"x" * 200_000
    )
    temp = tmp_path / "blobs" / "tmp"
    deadline = time.monotonic() + 10
    while not any(p.name.startswith("upload-") for p in temp.iterdir()):
        assert time.monotonic() < deadline, "the upload never reached the disk"
        time.sleep(0.1)
    assert service.server is not None
    os.killpg(service.server.process.pid, signal.SIGKILL)
    service.server.process.wait()
    upload.close()
    assert any(p.name.startswith("upload-") for p in temp.iterdir())  # what the crash left
    time.sleep(1.5)
    service.server = None
    service.start()  # with a worker this time
    deadline = time.monotonic() + 10
    while any(temp.iterdir()):
        assert time.monotonic() < deadline, f"left behind: {list(temp.iterdir())}"
        time.sleep(0.2)
    blobs = list((tmp_path / "blobs" / "sha256").glob("*/*/*"))
    assert len(blobs) == 2  # the job's checkpoint and dataset; the cut upload never landed
    done = _done(service, job_id)  # submitted before the crash, run after it
    assert done.state == "SUCCEEDED", done.error


@pytest.mark.parametrize(("soft", "hard"), [("3", "30"), ("600", "6")])
def test_a_job_past_its_time_limit_fails_with_a_clear_code(
    soft: str,
    hard: str,
    running: list[Running],
    tmp_path: Path,
    badnets_lab: LabModel,
    hub_zip: Path,
) -> None:
    """The soft limit ends the job cleanly; a hard kill is caught by the reaper."""
    service = _embedded(
        running, tmp_path, ANTIDOTE_SOFT_TIME_LIMIT_S=soft, ANTIDOTE_HARD_TIME_LIMIT_S=hard
    )
    job_id = _submit(service, badnets_lab, hub_zip, SLOW_INVERSION)
    done = _done(service, job_id, timeout=90)
    assert done.state == "FAILED"
    assert done.error is not None
    assert done.error["code"] == "TIME_LIMIT"
    assert done.attempt == 1


@pytest.mark.parametrize(
    ("stage", "options"), [("inversion", SLOW_INVERSION), ("tuning", SLOW_TUNING)]
)
def test_cancel_during_a_stage_ends_cancelled_within_seconds(
    stage: str,
    options: dict[str, object],
    running: list[Running],
    tmp_path: Path,
    badnets_lab: LabModel,
    hub_zip: Path,
) -> None:
    service = _embedded(running, tmp_path)
    job_id = _submit(service, badnets_lab, hub_zip, options)
    _until(service, job_id, lambda job: job.stage == stage and job.progress > 0.06)
    asked = time.monotonic()
    with service.client() as client:
        client.cancel(job_id)
    done = _done(service, job_id, timeout=30)
    assert done.state == "CANCELLED"
    assert done.stage == stage
    assert time.monotonic() - asked < 5
    with httpx.Client() as http:
        listing = http.get(
            f"{service.url}/v1/jobs/{job_id}/artifacts",
            headers={"Authorization": f"Bearer {service.key}"},
        )
    assert listing.json() == {"artifacts": []}  # a cancelled job publishes nothing
