"""Jobs: create (JSON or one-shot multipart), read, list, cancel."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import jobs
from service.api.deps import PrincipalDep, SessionDep, StateDep
from service.api.multipart import MultipartUpload
from service.api.routes.files import register_file
from service.api.schemas import JobList, JobOut, JobRequest, JobRequestParts, problem_responses
from service.api.state import AppState
from service.auth import Principal
from service.db import utcnow
from service.errors import Problem, error_pointers, not_found
from service.inputs import check_job_inputs
from service.models import TERMINAL, UNFINISHED, File, IdempotencyRecord, Job, JobState
from service.queue import publish

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

RETRY_AFTER_S = "5"
MAX_JSON_BODY = 1024 * 1024

CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["checkpoint", "dataset"],
                    "properties": {
                        "checkpoint": {"type": "string", "format": "binary"},
                        "dataset": {"type": "string", "format": "binary"},
                        "model_config": {"type": "string", "format": "binary"},
                        "request": {"type": "string", "description": "JobRequestParts as JSON"},
                    },
                }
            },
        },
    }
}


def job_out(job: Job) -> JobOut:
    return JobOut.model_validate(
        {
            "id": job.id,
            "state": job.state,
            "done": job.state in TERMINAL,
            "stage": job.stage,
            "progress": job.progress,
            "attempt": job.attempt,
            "create_time": job.create_time,
            "start_time": job.start_time,
            "update_time": job.update_time,
            "end_time": job.end_time,
            "request": job.request,
            "result": job.result,
            "error": job.error,
        }
    )


def _accepted(response: Response, job: Job) -> JobOut:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    response.headers["Retry-After"] = RETRY_AFTER_S
    return job_out(job)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    openapi_extra=CREATE_BODY,
    responses={
        202: {"description": "Accepted; poll the Location"},
        **problem_responses(400, 401, 404, 413, 415, 422, 429),
    },
)
async def create_job(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    state: StateDep,
    session: SessionDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobOut:
    """Validates everything it can, then answers 202; the job runs on a worker.

    Only reading the body happens on the event loop: the database work blocks, and a loop
    blocked on a pool checkout cannot let other requests give their connections back.
    """
    key = _idempotency_key(idempotency_key)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/"):
        body = await _from_multipart(request, state, session, principal)
    elif content_type.split(";")[0].strip() == "application/json":
        raw = await _json_body(request)
        try:
            body = JobRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise _invalid_request(exc) from exc
    else:
        raise Problem(415, "UNSUPPORTED_MEDIA_TYPE", "send application/json or multipart")
    job, created = await run_in_threadpool(_create, state, session, principal, key, body)
    if created:
        await run_in_threadpool(_publish, state, session, job)  # only after the commit
    return _accepted(response, job)


def _create(
    state: AppState, session: Session, principal: Principal, key: str | None, body: JobRequest
) -> tuple[Job, bool]:
    """The committed job and whether this request made it (False: a replay of the key)."""
    canonical = body.model_dump(mode="json")
    fingerprint = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
    if key is not None:
        replay = _replay(session, principal.tenant, key, fingerprint)
        if replay is not None:
            return replay, False
    _check_quota(session, principal, state.settings.max_active_jobs)
    files = _files_of(session, principal, body)
    paths = {name: state.blobs.path(row.sha256) for name, row in files.items()}
    check_job_inputs(body, paths)
    job = Job(id=jobs.new_job_id(), tenant=principal.tenant, request=canonical, stage="queued")
    session.add(job)
    session.flush()  # the idempotency record refers to the job row
    if key is not None:
        session.add(
            IdempotencyRecord(
                tenant=principal.tenant,
                key=key,
                fingerprint=fingerprint,
                job_id=job.id,
                expire_time=utcnow() + timedelta(seconds=state.settings.idempotency_ttl_s),
            )
        )
    try:
        session.commit()
    except IntegrityError:  # the same key raced in from a parallel request, which won
        session.rollback()
        replay = _replay(session, principal.tenant, key or "", fingerprint)
        if replay is None:
            raise
        return replay, False
    return job, True


def _publish(state: AppState, session: Session, job: Job) -> None:
    publish(state, [job.id])
    session.refresh(job)


@router.get("/{job_id}", response_model=JobOut, responses=problem_responses(401, 404))
def get_job(
    job_id: str, principal: PrincipalDep, session: SessionDep, response: Response
) -> JobOut:
    job = _own_job(session, principal, job_id)
    if job.state not in TERMINAL:
        response.headers["Retry-After"] = RETRY_AFTER_S
    return job_out(job)


@router.get("", response_model=JobList, responses=problem_responses(400, 401, 422))
def list_jobs(
    principal: PrincipalDep,
    session: SessionDep,
    state: StateDep,
    page_size: Annotated[int | None, Query(ge=0)] = None,
    page_token: Annotated[str | None, Query(max_length=512)] = None,
    job_state: Annotated[JobState | None, Query(alias="state")] = None,
) -> JobList:
    """Newest first, by keyset: pages stay stable while jobs are being added."""
    settings = state.settings
    size = min(page_size or settings.page_size_default, settings.page_size_max)
    filter_value = job_state.value if job_state else None
    query = select(Job).where(Job.tenant == principal.tenant)
    if filter_value:
        query = query.where(Job.state == filter_value)
    if page_token:
        created, last_id = _read_token(state, principal.tenant, page_token, filter_value)
        query = query.where(
            or_(Job.create_time < created, (Job.create_time == created) & (Job.id < last_id))
        )
    rows = list(
        session.execute(query.order_by(Job.create_time.desc(), Job.id.desc()).limit(size + 1))
        .scalars()
        .all()
    )
    more = len(rows) > size
    rows = rows[:size]
    token = None
    if more and rows:
        token = _make_token(state, principal.tenant, rows[-1], filter_value)
    return JobList(jobs=[job_out(row) for row in rows], next_page_token=token)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    responses=problem_responses(401, 404, 409),
)
def cancel_job(
    job_id: str, principal: PrincipalDep, session: SessionDep, response: Response
) -> JobOut:
    """Cooperative: a queued job ends at once; a running one stops at its next check."""
    job = _own_job(session, principal, job_id)
    try:
        job = jobs.request_cancel(session, job)
    except ValueError as exc:
        raise Problem(
            409, "INVALID_STATE_TRANSITION", f"the job has already ended as {job.state}"
        ) from exc
    session.commit()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


def _check_quota(session: Session, principal: Principal, limit: int) -> None:
    """One tenant cannot fill the queue for everyone. A soft cap: submissions racing at the
    limit may pass it by a few, which is fine for what it protects."""
    active = session.execute(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant == principal.tenant, Job.state.in_(UNFINISHED))
    ).scalar_one()
    if active >= limit:
        raise Problem(
            429,
            "TOO_MANY_ACTIVE_JOBS",
            f"the tenant has {active} unfinished jobs (limit {limit}); wait for some to end",
            headers={"Retry-After": "60"},
        )


def _own_job(session: Session, principal: Principal, job_id: str) -> Job:
    job = session.get(Job, job_id) if len(job_id) <= 40 else None
    if job is None or job.tenant != principal.tenant:
        raise not_found("job", job_id)
    return job


def _idempotency_key(value: str | None) -> str | None:
    """The draft's structured-header string, or a bare token; printable ASCII only."""
    if value is None:
        return None
    key = value.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or not all(33 <= ord(c) <= 126 for c in key):
        raise Problem(400, "IDEMPOTENCY_KEY_INVALID", "Idempotency-Key must be printable ASCII")
    return key


def _replay(session: Session, tenant: str, key: str, fingerprint: str) -> Job | None:
    record = session.execute(
        select(IdempotencyRecord).where(
            IdempotencyRecord.tenant == tenant,
            IdempotencyRecord.key == key,
            IdempotencyRecord.expire_time > utcnow(),
        )
    ).scalar_one_or_none()
    if record is None:
        return None
    if record.fingerprint != fingerprint:
        raise Problem(
            422,
            "IDEMPOTENCY_KEY_REUSED",
            "this Idempotency-Key was used with a different request body",
        )
    return session.get(Job, record.job_id)


def _files_of(session: Session, principal: Principal, body: JobRequest) -> dict[str, File]:
    found: dict[str, File] = {}
    for field in ("checkpoint_file", "dataset_file", "model_config_file"):
        ident = getattr(body, field)
        if ident is None:
            continue
        row = session.get(File, ident) if len(ident) <= 40 else None
        if row is None or row.tenant != principal.tenant:
            raise Problem(404, "FILE_NOT_FOUND", f"no file {ident!r} ({field})", field=field)
        found[field] = row
    return found


async def _json_body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BODY:
            raise Problem(413, "REQUEST_TOO_LARGE", "a JSON job request is capped at 1 MiB")
        chunks.append(chunk)
    return b"".join(chunks)


async def _from_multipart(
    request: Request, state: AppState, session: Session, principal: Principal
) -> JobRequest:
    upload = MultipartUpload(
        request.headers["content-type"], state.blobs, state.settings.max_upload_bytes
    )
    try:
        await upload.read(request.stream())
        missing = [name for name in ("checkpoint", "dataset") if name not in upload.parts]
        if missing:
            raise Problem(400, "MULTIPART_INVALID", f"missing part(s): {', '.join(missing)}")
        try:
            parts = JobRequestParts.model_validate_json(upload.request or b"{}")
        except ValidationError as exc:
            raise _invalid_request(exc) from exc
        blobs = upload.commit()  # only now: a refused request must leave no unreferenced blob
    finally:
        upload.discard()
    ids: dict[str, str] = {}
    for name, blob in blobs.items():
        ids[name] = await run_in_threadpool(register_file, session, principal.tenant, blob)
        state.metrics.upload_bytes.inc(blob.size)
    return JobRequest(
        checkpoint_file=ids["checkpoint"],
        dataset_file=ids["dataset"],
        model_config_file=ids.get("model_config"),
        **parts.model_dump(),
    )


def _invalid_request(exc: ValidationError) -> Problem:
    errors = error_pointers(exc.errors(include_url=False, include_input=False))
    return Problem(422, "REQUEST_INVALID", "the job request does not validate", errors=errors)


def _make_token(state: AppState, tenant: str, last: Job, filter_value: str | None) -> str:
    payload = json.dumps([last.create_time.isoformat(), last.id, filter_value]).encode()
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"{body}.{_sign(state, tenant, body)}"


def _read_token(
    state: AppState, tenant: str, token: str, filter_value: str | None
) -> tuple[datetime, str]:
    bad = Problem(400, "PAGE_TOKEN_INVALID", "page_token is not one this API issued for this list")
    body, _, signature = token.partition(".")
    # As bytes: compare_digest raises TypeError on a str with non-ASCII characters.
    if not hmac.compare_digest(signature.encode(), _sign(state, tenant, body).encode()):
        raise bad
    try:
        created, last_id, token_filter = json.loads(
            base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        )
        when = datetime.fromisoformat(created)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise bad from exc
    if token_filter != filter_value:
        raise Problem(400, "PAGE_TOKEN_INVALID", "page_token was issued for another state filter")
    return when, str(last_id)


def _sign(state: AppState, tenant: str, body: str) -> str:
    key = f"{state.settings.page_token_secret}\n{tenant}".encode()
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()[:32]
