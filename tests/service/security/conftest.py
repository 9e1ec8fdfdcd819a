"""A live embedded service for hostile-input cases, and the checks every case must pass after.

The cases go through the real HTTP API of ``antidote serve`` (uvicorn plus a Celery worker
process), because that is where an attacker stands: an in-process test client would skip the
HTTP parser, the worker's process boundary and the file system layout that these cases are
about. The server gets a private system temp dir (``TMPDIR``), so that what it leaves there can
be told apart from what anything else on the machine does.

After every case (an autouse fixture), the service must be unharmed:

- no canary file exists (no payload ran, in the API or in the worker);
- the data dir holds only the database, the broker's folders and content-addressed blobs (each
  new one named by the sha256 of its bytes, and each referred to by a file or artifact row, so
  none is orphaned), and ``blobs/tmp`` is empty once idle;
- the server's temp dir holds no ``antidote-*`` or ``upload-*`` leftovers, nor anything new
  but the worker pool's own ``pymp-*`` folder;
- ``/livez`` and an authenticated call still answer, and the worker process is the same one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from service.auth import create_key, revoke_key
from service.db import session_factory, transaction
from service.models import Artifact, File
from service.settings import Settings
from tests.service.support import Server, new_key, start_server, stop_server

PROBLEM = "application/problem+json"

FAST_OPTIONS: dict[str, Any] = {
    "rounds": 0,
    "search": {"steps": 30, "batch_size": 8},
    "tuning": {"steps": 20},
}
"""Every stage runs for real, in seconds, on the tiny lab model."""

UPLOAD_CAP = 64 * 1024
"""The second server's upload cap: small enough that crossing it costs nothing."""

JOB_TIMEOUT_S = 180.0

_DATABASE = re.compile(r"antidote\.db(-wal|-shm|-journal)?")
_BLOB = re.compile(r"blobs/sha256/([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})")
_LEFTOVER_PREFIXES = ("antidote-", "upload-")
_RUNTIME_TEMP = re.compile(r"pymp-\w+")
"""The worker pool's multiprocessing folder: made once by the runtime, removed at exit."""


@dataclass
class Snapshot:
    """What the data dir and the server's temp dir held before a case."""

    data_files: set[str]
    temp_entries: set[str]


@dataclass
class Deployment:
    """One live server: its dirs, a key for tenant ``sec`` and an HTTP client."""

    server: Server
    data_dir: Path
    temp_dir: Path
    settings: Settings
    key: str
    http: httpx.Client
    worker_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def blobs(self) -> Path:
        return self.data_dir / "blobs"

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def new_key(self, tenant: str) -> str:
        return new_key(self.settings, tenant)

    def new_revocable_key(self, tenant: str) -> tuple[str, str]:
        """A key and its id, for the revocation case."""
        with transaction(session_factory(self.settings.database)) as session:
            issued = create_key(session, tenant)
        return issued.id, issued.secret

    def revoke(self, key_id: str) -> None:
        with transaction(session_factory(self.settings.database)) as session:
            assert revoke_key(session, key_id)

    def put(self, body: bytes, key: str | None = None) -> httpx.Response:
        return self.http.put("/v1/files", content=body, headers=self.auth(key))

    def upload(self, body: bytes, key: str | None = None) -> str:
        response = self.put(body, key)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def create(self, body: dict[str, Any], key: str | None = None) -> httpx.Response:
        return self.http.post("/v1/jobs", json=body, headers=self.auth(key))

    def submit(
        self,
        checkpoint: bytes,
        dataset: bytes,
        *,
        model: str | None = "ViT-B-32",
        model_config: bytes | None = None,
        options: dict[str, Any] | None = None,
        known_triggers: list[dict[str, Any]] | None = None,
        key: str | None = None,
    ) -> httpx.Response:
        """Uploads both files (each must be accepted) and posts the job."""
        body: dict[str, Any] = {
            "checkpoint_file": self.upload(checkpoint, key),
            "dataset_file": self.upload(dataset, key),
            "model": model,
            "options": options or {},
            "known_triggers": known_triggers or [],
        }
        if model_config is not None:
            body["model_config_file"] = self.upload(model_config, key)
        return self.create(body, key)

    def wait(self, job_id: str, key: str | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            response = self.http.get(f"/v1/jobs/{job_id}", headers=self.auth(key))
            assert response.status_code == 200, response.text
            job: dict[str, Any] = response.json()
            if job["done"]:
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['state']}"
            time.sleep(0.2)

    def run(self, response: httpx.Response, key: str | None = None) -> dict[str, Any]:
        """The accepted job, waited for."""
        assert response.status_code == 202, response.text
        return self.wait(str(response.json()["id"]), key)

    # The checks every case ends with ----------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(_files(self.data_dir), _entries(self.temp_dir))

    def assert_unharmed(self, before: Snapshot, canaries: Path | None = None) -> None:
        self.assert_serving()
        self.assert_idle()
        if canaries is not None:
            assert sorted(canaries.iterdir()) == [], "a payload ran: its canary exists"
        after = _files(self.data_dir)
        for name in sorted(after):
            assert _expected_data_file(name), f"unexpected file in the data dir: {name}"
        referenced = self.referenced_blobs()
        for name in sorted(after):
            match = _BLOB.fullmatch(name)
            assert not match or match.group(3) in referenced, f"{name}: no file or artifact"
        for name in sorted(after - before.data_files):
            match = _BLOB.fullmatch(name)
            if match:  # a new blob: it must hold exactly the bytes its name says
                digest = hashlib.sha256((self.data_dir / name).read_bytes()).hexdigest()
                assert digest == match.group(3), f"{name} does not hold its own sha256"
        new_temp = {
            name
            for name in _entries(self.temp_dir) - before.temp_entries
            if not _RUNTIME_TEMP.fullmatch(name)
        }
        assert sorted(new_temp) == [], f"left in the server's temp dir: {sorted(new_temp)}"

    def referenced_blobs(self) -> set[str]:
        """Blobs some file or artifact row refers to; any other is left behind for good."""
        with session_factory(self.settings.database)() as session:
            files = session.scalars(select(File.sha256)).all()
            artifacts = session.scalars(select(Artifact.sha256)).all()
        return {*files, *artifacts}

    def assert_serving(self) -> None:
        assert self.server.process.poll() is None, "the server process died"
        live = self.http.get("/livez")
        assert live.status_code == 200, live.text
        assert live.json() == {"status": "ok"}
        listed = self.http.get("/v1/jobs", params={"page_size": 1}, headers=self.auth())
        assert listed.status_code == 200, listed.text
        if self.worker_pids:
            assert _worker_pids(self.server.process.pid) == self.worker_pids, "worker restarted"

    def assert_idle(self, timeout: float = 15.0) -> None:
        """No job of ours running and no temp file in flight: cleanup is prompt, not eventual."""
        deadline = time.monotonic() + timeout
        while True:
            busy = [
                job["id"]
                for state in ("PENDING", "RUNNING", "CANCELLING")
                for job in self.http.get(
                    "/v1/jobs", params={"state": state}, headers=self.auth()
                ).json()["jobs"]
            ]
            in_tmp = sorted(p.name for p in (self.blobs / "tmp").iterdir())
            leftovers = sorted(
                p.name for p in self.temp_dir.iterdir() if p.name.startswith(_LEFTOVER_PREFIXES)
            )
            if not (busy or in_tmp or leftovers):
                return
            assert time.monotonic() < deadline, (
                f"not idle after {timeout} s: jobs {busy}, blobs/tmp {in_tmp}, temp {leftovers}"
            )
            time.sleep(0.2)


def _files(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if not path.is_dir()}


def _entries(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def _expected_data_file(name: str) -> bool:
    blob = _BLOB.fullmatch(name)
    if blob:
        return blob.group(3).startswith(blob.group(1) + blob.group(2))
    return bool(_DATABASE.fullmatch(name)) or name.startswith("broker/")


def _worker_pids(server_pid: int) -> set[int]:
    """The embedded Celery worker: a child process of ``antidote serve`` (Linux ``/proc``)."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # it ended while we looked
            continue
        if int(fields[1]) == server_pid and b"celery" in cmdline:
            found.add(int(stat.parent.name))
    return found


def _wait_for_worker(server: Server, timeout: float = 60.0) -> set[int]:
    if not Path("/proc/self/stat").exists():
        return set()  # no /proc: the restart check is skipped, the rest still holds
    deadline = time.monotonic() + timeout
    while not (pids := _worker_pids(server.process.pid)):
        assert time.monotonic() < deadline, "the embedded worker never started"
        time.sleep(0.2)
    return pids


def _deploy(base: Path, extra_env: dict[str, str], *, api_only: bool) -> Deployment:
    data_dir, temp_dir = base / "var", base / "tmp"
    data_dir.mkdir()
    temp_dir.mkdir()
    env = {
        "ANTIDOTE_DATA_DIR": str(data_dir),
        "ANTIDOTE_LEASE_S": "10",
        "ANTIDOTE_PROGRESS_INTERVAL_S": "0.2",
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(temp_dir),
        **extra_env,
    }
    server = start_server(env, base / "serve.log", api_only=api_only)
    settings = Settings(data_dir=data_dir, database_url=None)
    http = httpx.Client(base_url=server.url, timeout=60)
    deployment = Deployment(server, data_dir, temp_dir, settings, new_key(settings, "sec"), http)
    if not api_only:
        deployment.worker_pids = _wait_for_worker(server)
    return deployment


def _teardown(deployment: Deployment) -> None:
    deployment.http.close()
    stop_server(deployment.server)


@pytest.fixture(scope="package")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The embedded service (API and worker) every case attacks; one for the whole package."""
    deployment = _deploy(tmp_path_factory.mktemp("service"), {}, api_only=False)
    try:
        yield deployment
    finally:
        _teardown(deployment)


@pytest.fixture(scope="package")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A second server with a small upload cap; API only, since no job gets that far."""
    extra = {"ANTIDOTE_MAX_UPLOAD_BYTES": str(UPLOAD_CAP)}
    deployment = _deploy(tmp_path_factory.mktemp("capped"), extra, api_only=True)
    try:
        yield deployment
    finally:
        _teardown(deployment)


@pytest.fixture(scope="package")
def canaries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where payloads would write if they ever ran; it must stay empty."""
    return tmp_path_factory.mktemp("canaries")


@pytest.fixture
def canary(canaries: Path, request: pytest.FixtureRequest) -> Path:
    """This case's canary path (absent, and it must stay so)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    return canaries / name


@pytest.fixture(autouse=True)
def unharmed(service: Deployment, canaries: Path, request: pytest.FixtureRequest) -> Iterator[None]:
    """Runs the after-case checks on every server the case used."""
    used = [service]
    if "capped" in request.fixturenames:
        used.append(request.getfixturevalue("capped"))
    before = [deployment.snapshot() for deployment in used]
    yield
    for deployment, snapshot in zip(used, before, strict=True):
        deployment.assert_unharmed(snapshot, canaries)


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """An RFC 9457 problem with the given status and stable code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    problem: dict[str, Any] = response.json()
    assert problem["code"] == code, problem
    assert problem["status"] == status
    assert problem["detail"]
    return problem


def assert_failed(job: dict[str, Any], code: str) -> dict[str, Any]:
    """A job that ended FAILED with a stable code, on its first attempt (no worker died)."""
    assert job["state"] == "FAILED", json.dumps(job)[:2000]
    assert job["result"] is None
    error: dict[str, Any] = job["error"]
    assert error["code"] == code, error
    assert job["attempt"] == 1
    return error
