"""The whole path, with real processes: ``antidote serve`` (uvicorn and a Celery worker process),
the Python client and the CLI, a tiny backdoored lab CLIP purified end to end.

Runs on the embedded default (SQLite, filesystem queue) and on PostgreSQL plus Redis.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from safetensors import safe_open

from service.client import AntidoteClient, Job
from tests.service.support import REPO, Server, start_server, stop_server
from worker.lab.make import LabModel

pytestmark = pytest.mark.slow

# Enough steps to run every stage for real, few enough for a 2-core CI machine.
FAST = {"rounds": 0, "search": {"steps": 30, "batch_size": 8}, "tuning": {"steps": 20}}
SLOW = {"rounds": 0, "search": {"steps": 20_000, "batch_size": 16}}
ARTIFACTS = {
    "head.safetensors",
    "prompts.safetensors",
    "trigger.safetensors",
    "trigger.png",
    "report.json",
    "report.html",
}


@dataclass
class Deployment:
    server: Server
    env: dict[str, str]
    key: str

    def client(self) -> AntidoteClient:
        return AntidoteClient(self.server.url, self.key, timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.cli.main", *args],
            env={**os.environ, **self.env, "ANTIDOTE_URL": self.server.url,
                 "ANTIDOTE_API_KEY": self.key},
            cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip


@pytest.fixture(scope="module")
def hub_zip(badnets_lab: LabModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lab model as users ship open_clip checkpoints: config and weights in one archive."""
    path = tmp_path_factory.mktemp("inputs") / "badnets-hub.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("open_clip_config.json", "open_clip_model.safetensors"):
            archive.write(badnets_lab.directory / name, f"badnets/{name}")
    return path


@pytest.fixture(scope="module", params=["embedded", "postgres-redis"])
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    data_dir = tmp_path_factory.mktemp(request.param)
    env = {
        "ANTIDOTE_DATA_DIR": str(data_dir),
        "ANTIDOTE_LEASE_S": "10",
        "ANTIDOTE_PROGRESS_INTERVAL_S": "0.2",
        "HF_HUB_OFFLINE": "1",
    }
    if request.param == "postgres-redis":
        env["ANTIDOTE_DATABASE_URL"] = request.getfixturevalue("pg_url")
        env["ANTIDOTE_BROKER_URL"] = request.getfixturevalue("redis_url")
    server = start_server(env, data_dir / "serve.log")
    try:
        created = subprocess.run(
            [sys.executable, "-m", "service.cli.main", "keys", "create", "--tenant", "e2e"],
            env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        yield Deployment(server, env, created.stdout.strip().splitlines()[-1])
    finally:
        stop_server(server)


def _wait(client: AntidoteClient, job_id: str, timeout: float = 240) -> Job:
    seen: list[tuple[str, float]] = []
    job = client.wait(
        job_id, poll=0.3, timeout=timeout, on_progress=lambda j: seen.append((j.state, j.progress))
    )
    progress = [p for state, p in seen if state == "RUNNING"]
    assert progress == sorted(progress), "progress never goes backwards"
    return job


def test_a_backdoored_checkpoint_is_purified_through_the_service(
    deployment: Deployment, badnets_lab: LabModel, hub_zip: Path, tmp_path: Path
) -> None:
    attack = json.loads((badnets_lab.directory / "attack.json").read_text())
    with deployment.client() as client:
        job = client.submit(
            hub_zip, badnets_lab.directory / "fewshot.zip", known_triggers=[attack], options=FAST
        )
        assert job.state == "PENDING"
        done = _wait(client, job.id)
        assert done.state == "SUCCEEDED", done.error
        assert done.attempt == 1
        assert done.progress == 1.0
        assert done.error is None
        assert done.result is not None
        assert done.result.verdict in ("backdoored", "suspicious", "clean")
        summary = done.result.summary
        assert summary.ca_before is not None
        assert summary.asr_before is not None
        assert {a.name for a in done.result.artifacts} == ARTIFACTS
        paths = client.download(job.id, tmp_path / "purified")
    assert {p.name for p in paths} == ARTIFACTS
    report = json.loads((tmp_path / "purified" / "report.json").read_text())
    assert report["verdict"] == done.result.verdict
    with safe_open(tmp_path / "purified" / "head.safetensors", "pt") as head:
        assert json.loads(head.metadata()["classes"]) == list(badnets_lab.class_names)
        assert head.get_tensor("class_embeddings").shape[0] == len(badnets_lab.class_names)


def test_artifacts_have_strong_etags_304_and_ranges(
    deployment: Deployment, badnets_lab: LabModel, hub_zip: Path
) -> None:
    with deployment.client() as client:
        job = next(j for j in client.list(state="SUCCEEDED"))
    url = f"{deployment.server.url}/v1/jobs/{job.id}/artifacts/report.json"
    auth = {"Authorization": f"Bearer {deployment.key}"}
    full = httpx.get(url, headers=auth)
    assert full.status_code == 200
    etag = full.headers["etag"]
    assert etag == f'"sha256:{hashlib.sha256(full.content).hexdigest()}"'
    assert httpx.get(url, headers={**auth, "If-None-Match": etag}).status_code == 304
    part = httpx.get(url, headers={**auth, "Range": "bytes=0-9"})
    assert part.status_code == 206
    assert part.content == full.content[:10]
    assert part.headers["content-range"] == f"bytes 0-9/{len(full.content)}"
    multi = httpx.get(url, headers={**auth, "Range": "bytes=0-1,4-5"})
    assert multi.status_code == 200
    assert multi.content == full.content
    missing = httpx.get(url.replace("report.json", "weights.bin"), headers=auth)
    assert missing.status_code == 404
    assert missing.json()["code"] == "ARTIFACT_NOT_FOUND"


def test_a_running_job_is_cancelled_within_seconds(
    deployment: Deployment, badnets_lab: LabModel, hub_zip: Path
) -> None:
    with deployment.client() as client:
        job = client.submit(hub_zip, badnets_lab.directory / "fewshot.zip", options=SLOW)
        deadline = time.monotonic() + 120
        while client.get(job.id).stage != "inversion":
            assert time.monotonic() < deadline, "the job never reached inversion"
            time.sleep(0.2)
        asked = time.monotonic()
        assert client.cancel(job.id).state == "CANCELLING"
        done = _wait(client, job.id, timeout=30)
        took = time.monotonic() - asked
    assert done.state == "CANCELLED"
    assert done.error is not None
    assert done.error["code"] == "CANCELLED"
    assert done.stage == "inversion"
    assert took < 10


def test_a_bad_checkpoint_fails_the_job_with_a_stable_code(
    deployment: Deployment, badnets_lab: LabModel, tmp_path: Path
) -> None:
    """Shapes cannot be checked without building the model, so this one reaches the worker."""
    wrong = tmp_path / "wrong-arch.json"
    config = json.loads((badnets_lab.directory / "open_clip_config.json").read_text())
    config["model_cfg"]["embed_dim"] += 8
    wrong.write_text(json.dumps(config["model_cfg"]))
    with deployment.client() as client:
        job = client.submit(
            badnets_lab.directory / "open_clip_model.safetensors",
            badnets_lab.directory / "fewshot.zip",
            model_config=wrong,
            options=FAST,
        )
        done = _wait(client, job.id)
    assert done.state == "FAILED"
    assert done.result is None
    assert done.error is not None
    assert done.error["code"] == "CHECKPOINT_ARCHITECTURE_MISMATCH"


def test_the_cli_submits_waits_and_downloads(
    deployment: Deployment, badnets_lab: LabModel, hub_zip: Path, tmp_path: Path
) -> None:
    if "ANTIDOTE_DATABASE_URL" in deployment.env:
        pytest.skip("the CLI is the same client; once, on the embedded default, is enough")
    options = tmp_path / "options.json"
    options.write_text(json.dumps(FAST))
    submitted = deployment.cli(
        "submit", str(hub_zip), str(badnets_lab.directory / "fewshot.zip"),
        "--known-trigger", str(badnets_lab.directory / "attack.json"),
        "--options", str(options), "--wait",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("job_")
    assert "CA" in submitted.stdout
    assert "ASR" in submitted.stdout
    status = deployment.cli("status", job_id)
    assert json.loads(status.stdout)["state"] == "SUCCEEDED"
    downloaded = deployment.cli("download", job_id, str(tmp_path / "out"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == ARTIFACTS
