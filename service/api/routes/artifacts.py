"""A job's artifacts: strong ETags (their sha256), 304 on a match, and single byte ranges."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse
from sqlalchemy import select
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from service import jobs
from service.api.deps import PrincipalDep, SessionDep, StateDep
from service.api.schemas import ArtifactList, ArtifactOut, problem_responses
from service.crud import jobs as crud_jobs
from service.errors import Problem, not_found
from service.models import Artifact, Job

router = APIRouter(prefix="/v1/jobs/{job_id}/artifacts", tags=["artifacts"])

# What the worker stores artifacts as (worker.tasks.MEDIA_TYPES), for the document.
ARTIFACT_MEDIA_TYPES = ("application/octet-stream", "application/json", "image/png", "text/html")
ARTIFACT_CONTENT: dict[str, dict[str, object]] = {media: {} for media in ARTIFACT_MEDIA_TYPES}


def _listing(job: Job, rows: list[Artifact]) -> list[ArtifactOut]:
    return [
        ArtifactOut(
            name=row.name,
            size=row.size,
            sha256=row.sha256,
            url=jobs.artifact_url(job.id, row.name),
        )
        for row in rows
    ]


@router.get("", response_model=ArtifactList, responses=problem_responses(401, 404))
def list_artifacts(job_id: str, principal: PrincipalDep, session: SessionDep) -> ArtifactList:
    job = crud_jobs.owned(session, tenant=principal.tenant, job_id=job_id)
    rows = session.execute(
        select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)
    ).scalars()
    return ArtifactList(artifacts=_listing(job, list(rows)))


@router.get(
    "/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": ARTIFACT_CONTENT},
        206: {"description": "One byte range", "content": ARTIFACT_CONTENT},
        304: {"description": "Matches If-None-Match"},
        **problem_responses(400, 401, 404, 416),
    },
)
def get_artifact(
    job_id: str,
    name: str,
    principal: PrincipalDep,
    session: SessionDep,
    state: StateDep,
    if_none_match: Annotated[str | None, Header()] = None,
    range_header: Annotated[str | None, Header(alias="range")] = None,
) -> Response:
    job = crud_jobs.owned(session, tenant=principal.tenant, job_id=job_id)
    row = session.get(Artifact, (job.id, name)) if len(name) <= 64 else None
    if row is None:
        raise not_found("artifact", name)
    etag = f'"sha256:{row.sha256}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "private, max-age=31536000, immutable",
        "Repr-Digest": f"sha-256=:{_b64(row.sha256)}:",
    }
    if if_none_match is not None and _matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    path = state.blobs.path(row.sha256)
    if range_header is not None and "," in range_header:
        # Multi-range answers are rarely right in practice; ignoring Range is allowed (RFC 9110).
        headers["Accept-Ranges"] = "bytes"
        return Response(path.read_bytes(), media_type=row.media_type, headers=headers)
    if range_header is not None:
        _check_range(range_header, row.size)
    return FileResponse(
        path,
        media_type=row.media_type,
        headers=headers,
        filename=name,
        content_disposition_type="attachment",
    )


def _check_range(header: str, size: int) -> None:
    """FileResponse answers a bad Range in text/plain; parsing it first, with the very parser
    FileResponse then uses, turns those answers into problems like every other error."""
    try:
        FileResponse._parse_range_header(header, size)
    except MalformedRangeHeader as exc:
        raise Problem(400, "RANGE_INVALID", exc.content) from exc
    except RangeNotSatisfiable as exc:
        raise Problem(
            416,
            "RANGE_NOT_SATISFIABLE",
            f"the artifact has {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        ) from exc


def _matches(header: str, etag: str) -> bool:
    candidates = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in candidates or etag in candidates


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()
