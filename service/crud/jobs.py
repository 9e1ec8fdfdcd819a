"""Job rows as the API reads and adds them: ownership, the tenant's quota, and keyset pages."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from service import jobs
from service.errors import Problem, not_found
from service.models import UNFINISHED, Job


def owned(session: Session, *, tenant: str, job_id: str) -> Job:
    """The tenant's job, or a 404: another tenant's job is as missing as one that never was."""
    job = session.get(Job, job_id) if len(job_id) <= 40 else None
    if job is None or job.tenant != tenant:
        raise not_found("job", job_id)
    return job


def check_quota(session: Session, *, tenant: str, limit: int) -> None:
    """One tenant cannot fill the queue for everyone. A soft cap: submissions racing at the
    limit may pass it by a few, which is fine for what it protects."""
    active = session.execute(
        select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.state.in_(UNFINISHED))
    ).scalar_one()
    if active >= limit:
        raise Problem(
            429,
            "TOO_MANY_ACTIVE_JOBS",
            f"the tenant has {active} unfinished jobs (limit {limit}); wait for some to end",
            headers={"Retry-After": "60"},
        )


def add(session: Session, *, tenant: str, request: dict[str, Any]) -> Job:
    """A new queued job row, flushed (not committed) so that other rows can refer to it."""
    job = Job(id=jobs.new_job_id(), tenant=tenant, request=request, stage="queued")
    session.add(job)
    session.flush()
    return job


def page(
    session: Session,
    *,
    tenant: str,
    state: str | None,
    after: tuple[datetime, str] | None,
    size: int,
) -> tuple[list[Job], bool]:
    """Up to ``size`` jobs, newest first, after the (create time, id) of the last one seen;
    and whether more follow. Keyset pages stay stable while jobs are being added."""
    query = select(Job).where(Job.tenant == tenant)
    if state:
        query = query.where(Job.state == state)
    if after is not None:
        created, last_id = after
        query = query.where(
            or_(Job.create_time < created, (Job.create_time == created) & (Job.id < last_id))
        )
    rows = list(
        session.execute(query.order_by(Job.create_time.desc(), Job.id.desc()).limit(size + 1))
        .scalars()
        .all()
    )
    return rows[:size], len(rows) > size
