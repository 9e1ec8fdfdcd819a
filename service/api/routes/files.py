"""``PUT /v1/files``: a raw streamed upload into the content-addressed blob store."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service.api.deps import PrincipalDep, SessionDep, StateDep
from service.api.schemas import FileOut, problem_responses
from service.blobs import BlobTooLargeError
from service.crud import files as crud_files
from service.errors import Problem, upload_too_large

router = APIRouter(prefix="/v1/files", tags=["files"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


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
    ident = await run_in_threadpool(
        partial(crud_files.register, session, tenant=principal.tenant, blob=blob)
    )
    return FileOut(id=ident, sha256=blob.sha256, size=blob.size)
