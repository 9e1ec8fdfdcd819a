"""``PUT /v1/files``: a raw streamed upload into the content-addressed blob store."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from service.api.deps import PrincipalDep, SessionDep, StateDep
from service.api.schemas import FileOut, problem_responses
from service.blobs import Blob, BlobTooLargeError
from service.errors import Problem, upload_too_large
from service.models import File

router = APIRouter(prefix="/v1/files", tags=["files"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def file_id(tenant: str, sha256: str) -> str:
    """Stable per tenant and content: the same bytes again give the same id."""
    return "file_" + hashlib.sha256(f"{tenant}\n{sha256}".encode()).hexdigest()[:32]


@router.put(
    "",
    status_code=201,
    response_model=FileOut,
    openapi_extra=UPLOAD_BODY,
    responses=problem_responses(400, 401, 413),
)
async def upload_file(
    request: Request, principal: PrincipalDep, state: StateDep, session: SessionDep
) -> FileOut:
    """Streams the body to a temp file, hashing as it goes; 413 the moment the cap is crossed."""
    limit = state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Problem(400, "CONTENT_LENGTH_INVALID", "Content-Length is not a number")
        if int(declared) > limit:
            state.metrics.uploads_rejected.labels("UPLOAD_TOO_LARGE").inc()
            raise upload_too_large(limit)
    with state.blobs.writer(limit) as writer:
        try:
            async for chunk in request.stream():
                writer.write(chunk)
        except BlobTooLargeError as exc:
            state.metrics.uploads_rejected.labels("UPLOAD_TOO_LARGE").inc()
            raise upload_too_large(limit) from exc
        except ClientDisconnect as exc:
            raise Problem(400, "UPLOAD_INCOMPLETE", "the client went away mid-upload") from exc
        if declared is not None and writer.size != int(declared):
            raise Problem(400, "UPLOAD_INCOMPLETE", "the body is shorter than Content-Length")
        if writer.size == 0:
            raise Problem(400, "UPLOAD_EMPTY", "the body is empty")
        blob = writer.commit()
    state.metrics.upload_bytes.inc(blob.size)
    ident = await run_in_threadpool(register_file, session, principal.tenant, blob)
    return FileOut(id=ident, sha256=blob.sha256, size=blob.size)


def register_file(session: Session, tenant: str, blob: Blob) -> str:
    """Blocks on the database, so async routes run it in the threadpool: on the event loop a
    wait for a pooled connection would stall the requests that are to give one back."""
    ident = file_id(tenant, blob.sha256)
    if session.get(File, ident) is None:
        session.add(File(id=ident, tenant=tenant, sha256=blob.sha256, size=blob.size))
        try:
            session.commit()
        except IntegrityError:  # the same bytes raced in from a parallel upload
            session.rollback()
            session.execute(select(File).where(File.id == ident)).scalar_one()
    return ident
