"""Compare-and-set job transitions, on SQLite and on PostgreSQL: one runner at a time, always."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from service import jobs
from service.db import session_factory, transaction
from service.models import Job, JobState
from tests.service.support import embedded_settings


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = embedded_settings(tmp_path / "var").database
    else:
        url = request.getfixturevalue("pg_url")
    factory = session_factory(url)
    yield factory
    with transaction(factory) as session:
        session.execute(delete(Job).where(Job.tenant == "state-machine"))


def _pending(factory: sessionmaker[Session]) -> str:
    job_id = jobs.new_job_id()
    with transaction(factory) as session:
        session.add(Job(id=job_id, tenant="state-machine", request={}))
    return job_id


def _job(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _claim(factory: sessionmaker[Session], job_id: str, lease_s: float = 60) -> jobs.Claim | None:
    with transaction(factory) as session:
        return jobs.claim(session, job_id, lease_s=lease_s, max_attempts=2)


def test_a_claimed_job_cannot_be_claimed_again(sessions: sessionmaker[Session]) -> None:
    job_id = _pending(sessions)
    first = _claim(sessions, job_id)
    assert first is not None
    assert first.attempt == 1
    assert _claim(sessions, job_id) is None  # a redelivered message does nothing
    job = _job(sessions, job_id)
    assert (job.state, job.attempt, job.runner) == ("RUNNING", 1, first.token)


def test_a_lapsed_lease_is_taken_over_and_the_old_runner_is_locked_out(
    sessions: sessionmaker[Session],
) -> None:
    job_id = _pending(sessions)
    old = _claim(sessions, job_id, lease_s=0.05)
    assert old is not None
    time.sleep(0.1)
    new = _claim(sessions, job_id)
    assert new is not None
    assert new.attempt == 2
    with transaction(sessions) as session, pytest.raises(jobs.LostClaimError):
        jobs.heartbeat(session, old, lease_s=60, progress=0.5)
    with transaction(sessions) as session, pytest.raises(jobs.LostClaimError):
        jobs.finish(session, old, JobState.SUCCEEDED, result={"x": 1})
    with transaction(sessions) as session:
        jobs.finish(session, new, JobState.SUCCEEDED, result={"x": 2})
    job = _job(sessions, job_id)
    assert (job.state, job.result, job.stage, job.progress) == ("SUCCEEDED", {"x": 2}, "done", 1.0)


def test_attempts_are_bounded(sessions: sessionmaker[Session]) -> None:
    job_id = _pending(sessions)
    assert _claim(sessions, job_id, lease_s=0.01) is not None
    time.sleep(0.05)
    assert _claim(sessions, job_id, lease_s=0.01) is not None
    time.sleep(0.05)
    assert _claim(sessions, job_id) is None  # a third loss: the input may be what kills workers
    job = _job(sessions, job_id)
    assert job.state == "FAILED"
    assert job.error is not None
    assert job.error["code"] == "WORKER_LOST"
    assert job.result is None


def test_heartbeat_records_progress_and_reports_cancel(sessions: sessionmaker[Session]) -> None:
    job_id = _pending(sessions)
    held = _claim(sessions, job_id)
    assert held is not None
    with transaction(sessions) as session:
        assert jobs.heartbeat(session, held, lease_s=60, stage="tuning", progress=0.4) is False
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        jobs.request_cancel(session, job)
    assert _job(sessions, job_id).state == "CANCELLING"
    with transaction(sessions) as session:
        assert jobs.heartbeat(session, held, lease_s=60) is True
    with transaction(sessions) as session:
        jobs.mark_cancelled(session, held)
    job = _job(sessions, job_id)
    assert (job.state, job.stage, job.progress) == ("CANCELLED", "tuning", 0.4)
    assert job.error is not None
    assert job.error["code"] == "CANCELLED"


def test_cancel_before_start_ends_at_once_and_the_worker_skips_it(
    sessions: sessionmaker[Session],
) -> None:
    job_id = _pending(sessions)
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert jobs.request_cancel(session, job).state == "CANCELLED"
    assert _claim(sessions, job_id) is None
    assert _job(sessions, job_id).attempt == 0


def test_cancel_of_a_finished_job_is_refused(sessions: sessionmaker[Session]) -> None:
    job_id = _pending(sessions)
    held = _claim(sessions, job_id)
    assert held is not None
    with transaction(sessions) as session:
        jobs.finish(session, held, JobState.FAILED, error={"code": "X"})
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        with pytest.raises(ValueError, match="FAILED"):
            jobs.request_cancel(session, job)


def test_finish_needs_exactly_one_of_result_and_error(sessions: sessionmaker[Session]) -> None:
    job_id = _pending(sessions)
    held = _claim(sessions, job_id)
    assert held is not None
    with transaction(sessions) as session, pytest.raises(ValueError, match="exactly one"):
        jobs.finish(session, held, JobState.SUCCEEDED, result={}, error={})


def test_the_reaper_hands_back_lost_jobs_and_republishes_unclaimed_ones(
    sessions: sessionmaker[Session],
) -> None:
    lost = _pending(sessions)
    assert _claim(sessions, lost, lease_s=0.01) is not None
    unpublished = _pending(sessions)
    running = _pending(sessions)
    assert _claim(sessions, running) is not None
    time.sleep(0.05)
    with transaction(sessions) as session:
        due = jobs.reap(session, max_attempts=3, requeue_pending_after_s=3600)
    assert lost in due
    assert unpublished in due
    assert running not in due
    assert _job(sessions, lost).state == "PENDING"
    assert _job(sessions, running).state == "RUNNING"
    with transaction(sessions) as session:
        jobs.mark_published(session, due)
        again = jobs.reap(session, max_attempts=3, requeue_pending_after_s=3600)
    assert lost not in again
    assert unpublished not in again


def test_the_reaper_fails_a_job_lost_on_its_last_attempt(sessions: sessionmaker[Session]) -> None:
    job_id = _pending(sessions)
    assert _claim(sessions, job_id, lease_s=0.01) is not None
    time.sleep(0.05)
    with transaction(sessions) as session:
        assert job_id not in jobs.reap(session, max_attempts=1, requeue_pending_after_s=3600)
    job = _job(sessions, job_id)
    assert job.state == "FAILED"
    assert job.error is not None
    assert job.error["code"] == "WORKER_LOST"


def test_the_reaper_fails_a_job_killed_at_its_time_limit(sessions: sessionmaker[Session]) -> None:
    job_id = _pending(sessions)
    assert _claim(sessions, job_id, lease_s=0.01) is not None
    time.sleep(0.05)
    with transaction(sessions) as session:
        due = jobs.reap(session, max_attempts=3, requeue_pending_after_s=3600, time_limit_s=0.02)
    assert job_id not in due
    job = _job(sessions, job_id)
    assert job.state == "FAILED"
    assert job.error is not None
    assert job.error["code"] == "TIME_LIMIT"
