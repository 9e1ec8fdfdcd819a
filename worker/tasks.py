"""The one task: claim a job, run ``purify`` on it, publish its artifacts, record the outcome.

It carries only the job id; everything else is read from the database and the blob store, so a
message redelivered hours later still does the right thing (usually nothing).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import structlog
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from service import jobs
from service.blobs import BlobStore
from service.db import session_factory, transaction
from service.errors import problem_body, problem_of
from service.models import Artifact, File, Job, JobState
from service.settings import Settings, get_settings
from worker.cbpt.attacks import parse_attack
from worker.cbpt.options import PurifyOptions, Runtime
from worker.cbpt.progress import CancelledError, overall_fraction
from worker.celery_app import TASK_NAME, app

log = structlog.get_logger()

MEDIA_TYPES = {
    ".safetensors": "application/octet-stream",
    ".png": "image/png",
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
}


@app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]
def run_job(job_id: str) -> None:
    run(job_id, get_settings())


def run(job_id: str, settings: Settings) -> None:
    factory = session_factory(settings.database)
    with transaction(factory) as session:
        held = jobs.claim(
            session, job_id, lease_s=settings.lease_s, max_attempts=settings.max_attempts
        )
    if held is None:
        log.info("job.skipped", job_id=job_id, reason="not claimable")
        return
    structlog.contextvars.bind_contextvars(job_id=job_id, attempt=held.attempt)
    try:
        _run_claimed(held, factory, settings)
    finally:
        structlog.contextvars.unbind_contextvars("job_id", "attempt")


def _run_claimed(held: jobs.Claim, factory: sessionmaker[Session], settings: Settings) -> None:
    log.info("job.started")
    beat = _Heartbeat(factory, held, settings)
    beat.start()
    outcome: tuple[JobState, dict[str, Any] | None, dict[str, Any] | None]
    published: list[Artifact] = []
    try:
        succeeded, published = _purify(held.job_id, factory, settings, beat)
        outcome = (JobState.SUCCEEDED, succeeded, None)
    except jobs.LostClaimError:
        log.warning("job.claim_lost")
        return
    except _CancelledByClientError:
        outcome = (JobState.CANCELLED, None, None)
    except SoftTimeLimitExceeded:
        limit = problem_body(
            500, "TIME_LIMIT", f"the job ran past its {settings.soft_limit_s} s time limit"
        )
        outcome = (JobState.FAILED, None, limit)
    except Exception as exc:  # every failure must reach the job record, whatever it is
        problem = _error_of(exc)
        outcome = (JobState.FAILED, None, problem)
        log.exception("job.failed", code=problem["code"])
    finally:
        beat.stop()
    state, result, error = outcome
    try:
        with transaction(factory) as session:
            if state is JobState.CANCELLED:
                jobs.mark_cancelled(session, held)
            else:
                jobs.finish(session, held, state, result=result, error=error)
                for artifact in published:  # listed only once the job has succeeded
                    session.merge(artifact)
    except jobs.LostClaimError:
        log.warning("job.claim_lost_at_finish")
        return
    log.info("job.finished", state=state.value)


class _CancelledByClientError(Exception):
    pass


class _Heartbeat:
    """Renews the lease from a thread, so a long step never looks like a dead worker.

    The engine's progress callback only records the newest stage and fraction; this thread
    writes them (at most once per ``progress_interval_s``) and brings back the cancel flag.
    """

    def __init__(
        self, factory: sessionmaker[Session], held: jobs.Claim, settings: Settings
    ) -> None:
        self._factory = factory
        self._held = held
        self._settings = settings
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._progress: float | None = None
        self.cancel_requested = False
        self.lost = False
        self._thread = threading.Thread(target=self._loop, name="job-heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def record(self, stage: str, progress: float) -> None:
        with self._lock:
            self._stage, self._progress = stage, progress

    def _loop(self) -> None:
        interval = max(
            0.2, min(self._settings.lease_s / 4, self._settings.progress_interval_s or 1.0)
        )
        while not self._stop.wait(interval):
            self._beat()

    def _beat(self) -> None:
        with self._lock:
            stage, progress = self._stage, self._progress
        try:
            with transaction(self._factory) as session:
                self.cancel_requested = jobs.heartbeat(
                    session,
                    self._held,
                    lease_s=self._settings.lease_s,
                    stage=stage,
                    progress=progress,
                )
        except jobs.LostClaimError:
            self.lost = True
        except Exception:  # a database blip must not kill the job; the next beat retries
            log.warning("job.heartbeat_failed", exc_info=True)


def _purify(
    job_id: str, factory: sessionmaker[Session], settings: Settings, beat: _Heartbeat
) -> tuple[dict[str, Any], list[Artifact]]:
    """Runs the engine; returns the result and the artifact rows, already in the blob store."""
    from worker.cbpt.purify import Inputs, purify

    store = BlobStore(settings.blobs)
    with transaction(factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        request = dict(job.request)
        blobs = {
            key: session.get(File, request[key])
            for key in ("checkpoint_file", "dataset_file", "model_config_file")
            if request.get(key)
        }
    paths = {key: store.path(row.sha256) for key, row in blobs.items() if row is not None}
    options = _job_options(request.get("options") or {})
    triggers = tuple(parse_attack(spec) for spec in request.get("known_triggers", []))
    architecture: str | dict[str, Any] | None = request.get("model")
    if "model_config_file" in paths:
        architecture = json.loads(paths["model_config_file"].read_text())

    def progress(stage: str, fraction: float) -> None:
        beat.record(stage, overall_fraction(stage, fraction))

    def should_cancel() -> bool:
        return beat.cancel_requested or beat.lost

    scratch = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=store.tmp))
    try:
        try:
            outcome = purify(
                Inputs(
                    paths["checkpoint_file"],
                    paths["dataset_file"],
                    architecture=architecture,
                    known_triggers=triggers,
                ),
                options,
                out_dir=scratch / "out",
                runtime=Runtime(settings.device, settings.precision),
                progress=progress,
                should_cancel=should_cancel,
            )
        except CancelledError as exc:
            if beat.lost:
                raise jobs.LostClaimError(job_id) from exc
            raise _CancelledByClientError from exc
        artifacts: list[dict[str, Any]] = []
        rows: list[Artifact] = []
        for name, path in sorted(outcome.artifacts.items()):
            blob = store.put_file(path)
            media = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
            rows.append(
                Artifact(
                    job_id=job_id, name=name, sha256=blob.sha256, size=blob.size, media_type=media
                )
            )
            artifacts.append(
                {
                    "name": name,
                    "size": blob.size,
                    "sha256": blob.sha256,
                    "url": jobs.artifact_url(job_id, name),
                }
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result: dict[str, Any] = {
        "verdict": outcome.verdict,
        "suspected_target": outcome.suspected_target,
        "summary": outcome.report.summary.model_dump(),
        "artifacts": artifacts,
    }
    return result, rows


def _error_of(exc: BaseException) -> dict[str, Any]:
    """A problem object with the engine's stable code for bad input; INTERNAL for our faults."""
    problem = problem_of(exc)
    return problem_body(problem.status, problem.code, problem.detail, **problem.extra)


def _job_options(raw: dict[str, Any]) -> PurifyOptions:
    """A job's options as the API accepted them. A job accepted before device and precision
    became the worker's settings may still name them: the worker's settings win, so that a job
    queued across an upgrade runs rather than fails."""
    return PurifyOptions.model_validate(
        {name: value for name, value in raw.items() if name not in ("device", "precision")}
    )
