"""Publishing jobs to the worker queue, always after the job row is committed.

A publish that fails (broker down) loses nothing: the job stays PENDING with no publish time,
and the reaper publishes it again.
"""

from __future__ import annotations

import structlog

from service import jobs
from service.api.state import AppState
from service.broker import TASK_NAME
from service.db import transaction

log = structlog.get_logger()


def publish(state: AppState, job_ids: list[str]) -> None:
    sent: list[str] = []
    for job_id in job_ids:
        try:
            state.celery.send_task(
                TASK_NAME,
                args=[job_id],
                queue=state.settings.worker_queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
            sent.append(job_id)
        except Exception:  # the reaper retries; the client already holds a PENDING job
            log.warning("job.publish_failed", job_id=job_id, exc_info=True)
    with transaction(state.sessions) as session:
        jobs.mark_published(session, sent)


def reap_and_republish(state: AppState) -> list[str]:
    settings = state.settings
    with transaction(state.sessions) as session:
        due = jobs.reap(
            session,
            max_attempts=settings.max_attempts,
            requeue_pending_after_s=settings.requeue_pending_after_s,
            time_limit_s=settings.hard_time_limit_s,
        )
    if due:
        log.info("jobs.republish", count=len(due))
        publish(state, due)
    swept = state.blobs.sweep(
        upload_age_s=settings.stale_upload_s, scratch_age_s=settings.hard_time_limit_s + 600
    )
    if swept:
        log.info("blobs.swept", count=len(swept))
    return due
