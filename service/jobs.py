"""Job state transitions, each a compare-and-set UPDATE, shared by the API, worker and reaper.

Every write names the state it expects (and, for a running job, the claim token of the attempt
that holds it), so two processes can never both move a job: a redelivered task finds the job
claimed and leaves it, and an attempt that lost its lease can no longer write.

    PENDING -> RUNNING -> SUCCEEDED | FAILED
    PENDING -> CANCELLED;  RUNNING -> CANCELLING -> CANCELLED (or whatever ends first)
    RUNNING with a lapsed lease -> PENDING again (reaper), or FAILED after max attempts
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.db import utcnow
from service.errors import problem_body
from service.models import TERMINAL, Job, JobState

ACTIVE = (JobState.RUNNING.value, JobState.CANCELLING.value)


def artifact_url(job_id: str, name: str) -> str:
    """Where a job's artifact is downloaded from: the job's result and the listing both say."""
    return f"/v1/jobs/{job_id}/artifacts/{name}"


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex


@dataclass(frozen=True)
class Claim:
    """The right of one attempt to run a job; ``token`` guards all of its writes."""

    job_id: str
    token: str
    attempt: int


class LostClaimError(Exception):
    """The job moved on without this attempt (reaped, or finished elsewhere): stop working."""


def claim(session: Session, job_id: str, *, lease_s: float, max_attempts: int) -> Claim | None:
    """Takes a PENDING job, or a RUNNING one whose lease lapsed; None if there is nothing to do.

    A job cancelled before it started ends here as CANCELLED; a job lost by too many workers
    ends FAILED, so an OOM-killing input cannot loop forever.
    """
    now = utcnow()
    token = uuid.uuid4().hex
    claimable = or_(
        Job.state == JobState.PENDING.value,
        (Job.state == JobState.RUNNING.value) & (Job.lease_until < now),
    )
    taken = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable, Job.cancel_requested.is_(False))
        .values(
            state=JobState.RUNNING.value,
            attempt=Job.attempt + 1,
            runner=token,
            lease_until=now + timedelta(seconds=lease_s),
            start_time=now,
            update_time=now,
            stage="queued",
            progress=0.0,
        )
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        _settle_cancel_before_start(session, job_id)
        return None
    attempt = session.execute(select(Job.attempt).where(Job.id == job_id)).scalar_one()
    if attempt > max_attempts:
        error = problem_body(
            500,
            "WORKER_LOST",
            f"the worker running this job was lost {attempt - 1} times; not retrying",
        )
        finish(session, Claim(job_id, token, attempt), JobState.FAILED, error=error)
        return None
    return Claim(job_id, token, attempt)


def _settle_cancel_before_start(session: Session, job_id: str) -> None:
    now = utcnow()
    session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.state.in_([JobState.PENDING.value, JobState.CANCELLING.value]),
            or_(Job.runner.is_(None), Job.lease_until < now),
            Job.cancel_requested.is_(True),
        )
        .values(**_ended(JobState.CANCELLED, _cancelled()))
    )


def heartbeat(
    session: Session,
    held: Claim,
    *,
    lease_s: float,
    stage: str | None = None,
    progress: float | None = None,
) -> bool:
    """Extends the lease (and records progress); returns whether a cancel was requested."""
    now = utcnow()
    values: dict[str, Any] = {"lease_until": now + timedelta(seconds=lease_s), "update_time": now}
    if stage is not None:
        values["stage"] = stage
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    result = session.execute(
        update(Job)
        .where(Job.id == held.job_id, Job.runner == held.token, Job.state.in_(ACTIVE))
        .values(**values)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LostClaimError(held.job_id)
    cancel = session.execute(select(Job.cancel_requested).where(Job.id == held.job_id))
    return bool(cancel.scalar_one())


def finish(
    session: Session,
    held: Claim,
    state: JobState,
    *,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> None:
    """Ends the attempt's job in a terminal state: exactly one of ``result`` and ``error``."""
    if state not in TERMINAL or (result is None) == (error is None):
        raise ValueError("a terminal state with exactly one of result and error")
    now = utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == held.job_id, Job.runner == held.token, Job.state.in_(ACTIVE))
        .values(
            state=state.value,
            result=result,
            error=error,
            end_time=now,
            update_time=now,
            lease_until=None,
            progress=1.0 if state is JobState.SUCCEEDED else Job.progress,
            # A failed or cancelled job keeps the stage it stopped in; that is where to look.
            stage="done" if state is JobState.SUCCEEDED else Job.stage,
        )
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        raise LostClaimError(held.job_id)


def request_cancel(session: Session, job: Job) -> Job:
    """Cooperative cancel: a queued job ends at once, a running one is flagged for its worker.

    Returns the job as it now stands; raises ValueError if it had already ended.
    """
    now = utcnow()
    if job.state == JobState.PENDING.value:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.PENDING.value)
            .values(
                state=JobState.CANCELLED.value,
                cancel_requested=True,
                error=_cancelled(),
                end_time=now,
                update_time=now,
            )
        )
    elif job.state == JobState.RUNNING.value:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.RUNNING.value)
            .values(state=JobState.CANCELLING.value, cancel_requested=True, update_time=now)
        )
    session.refresh(job)
    if job.state in (JobState.SUCCEEDED.value, JobState.FAILED.value):
        raise ValueError(job.state)
    return job


def mark_cancelled(session: Session, held: Claim) -> None:
    finish(session, held, JobState.CANCELLED, error=_cancelled())


def _ended(state: JobState, error: dict[str, Any]) -> dict[str, Any]:
    """The column values of a job that ends without its worker: nobody holds it any more."""
    now = utcnow()
    return {
        "state": state.value,
        "error": error,
        "end_time": now,
        "update_time": now,
        "runner": None,
        "lease_until": None,
    }


def _cancelled() -> dict[str, Any]:
    return problem_body(409, "CANCELLED", "the job was cancelled at the client's request")


def reap(
    session: Session,
    *,
    max_attempts: int,
    requeue_pending_after_s: float,
    time_limit_s: float | None = None,
) -> list[str]:
    """Hands back jobs whose worker vanished; returns the ids to publish again.

    A RUNNING job whose lease lapsed goes back to PENDING (or FAILED once it has used its
    attempts; a CANCELLING one ends CANCELLED); a PENDING job published long ago without being
    claimed is published again, since a broker may have lost its message. Republishing is safe:
    the claim lets only one attempt run.
    """
    now = utcnow()
    lapsed = Job.lease_until < now
    running = Job.state == JobState.RUNNING.value
    if time_limit_s is not None:
        # Killed at the hard time limit: running it again would only hit the limit again.
        too_long = Job.start_time < now - timedelta(seconds=time_limit_s)
        message = f"the job ran past its {time_limit_s:.0f} s time limit"
        error = problem_body(500, "TIME_LIMIT", message)
        session.execute(
            update(Job).where(running, lapsed, too_long).values(**_ended(JobState.FAILED, error))
        )
    session.execute(
        update(Job)
        .where(Job.state == JobState.CANCELLING.value, lapsed)
        .values(**_ended(JobState.CANCELLED, _cancelled()))
    )
    lost = problem_body(500, "WORKER_LOST", f"the worker was lost on all {max_attempts} attempts")
    session.execute(
        update(Job)
        .where(running, lapsed, Job.attempt >= max_attempts)
        .values(**_ended(JobState.FAILED, lost))
    )
    session.execute(
        update(Job)
        .where(Job.state == JobState.RUNNING.value, lapsed)
        .values(
            state=JobState.PENDING.value,
            stage="requeued",
            runner=None,
            lease_until=None,
            update_time=now,
            publish_time=None,
        )
    )
    stale = now - timedelta(seconds=requeue_pending_after_s)
    rows = session.execute(
        select(Job.id).where(
            Job.state == JobState.PENDING.value,
            or_(Job.publish_time.is_(None), Job.publish_time < stale),
        )
    )
    return [row[0] for row in rows]


def mark_published(session: Session, job_ids: list[str]) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(publish_time=utcnow()))
