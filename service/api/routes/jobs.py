"""Jobs: create (JSON or one-shot multipart), read, list, cancel."""

from __future__ import annotations

import hashlib
import json
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import jobs
from service.api.deps import PrincipalDep, SessionDep, StateDep
from service.api.inputs import check_job_inputs
from service.api.multipart import MultipartUpload
from service.api.publish import publish
from service.api.schemas import JobList, JobOut, JobRequest, JobRequestParts, problem_responses
from service.api.state import AppState
from service.auth import Principal
from service.crud import files as crud_files
from service.crud import idempotency, page_tokens
from service.crud import jobs as crud_jobs
from service.errors import Problem, error_pointers
from service.models import TERMINAL, Job, JobState

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
    tenant, settings = principal.tenant, state.settings
    canonical = body.model_dump(mode="json")
    fingerprint = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
    if key is not None:
        replay = idempotency.replay(session, tenant=tenant, key=key, fingerprint=fingerprint)
        if replay is not None:
            return replay, False
    crud_jobs.check_quota(session, tenant=tenant, limit=settings.max_active_jobs)
    ids = {field: getattr(body, field) for field in crud_files.JOB_FILE_FIELDS}
    files = crud_files.owned(session, tenant=tenant, ids=ids)
    check_job_inputs(body, {name: state.blobs.path(row.sha256) for name, row in files.items()})
    job = crud_jobs.add(session, tenant=tenant, request=canonical)
    if key is not None:
        idempotency.remember(
            session,
            tenant=tenant,
            key=key,
            fingerprint=fingerprint,
            job_id=job.id,
            ttl_s=settings.idempotency_ttl_s,
        )
    try:
        session.commit()
    except IntegrityError:  # the same key raced in from a parallel request, which won
        session.rollback()
        replay = idempotency.replay(session, tenant=tenant, key=key or "", fingerprint=fingerprint)
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
    job = crud_jobs.owned(session, tenant=principal.tenant, job_id=job_id)
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
    settings, tenant = state.settings, principal.tenant
    size = min(page_size or settings.page_size_default, settings.page_size_max)
    filter_value = job_state.value if job_state else None
    secret = settings.page_token_secret
    after = None
    if page_token:
        after = page_tokens.read(secret=secret, tenant=tenant, token=page_token, state=filter_value)
    rows, more = crud_jobs.page(session, tenant=tenant, state=filter_value, after=after, size=size)
    token = None
    if more and rows:
        last = (rows[-1].create_time, rows[-1].id)
        token = page_tokens.make(secret=secret, tenant=tenant, position=last, state=filter_value)
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
    job = crud_jobs.owned(session, tenant=principal.tenant, job_id=job_id)
    try:
        job = jobs.request_cancel(session, job)
    except ValueError as exc:
        raise Problem(
            409, "INVALID_STATE_TRANSITION", f"the job has already ended as {job.state}"
        ) from exc
    session.commit()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


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
        ids[name] = await run_in_threadpool(
            partial(crud_files.register, session, tenant=principal.tenant, blob=blob)
        )
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
