"""The API's JSON shapes (the OpenAPI document at /openapi.json); field names are a contract
with clients."""

from __future__ import annotations

from datetime import datetime
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.errors import PROBLEM_MEDIA_TYPE
from worker.cbpt.outcome import Summary


class FileOut(BaseModel):
    id: str
    sha256: str
    size: int


class JobRequest(BaseModel):
    """What a client asks for. ``options`` and ``known_triggers`` are checked against the
    engine's own models before the job is accepted."""

    model_config = ConfigDict(extra="forbid")

    checkpoint_file: str = Field(max_length=64)
    dataset_file: str = Field(max_length=64)
    model: str | None = Field(default=None, max_length=128)
    model_config_file: str | None = Field(default=None, max_length=64)
    known_triggers: list[dict[str, Any]] = Field(default_factory=list, max_length=16)
    options: dict[str, Any] = Field(default_factory=dict)


class JobRequestParts(BaseModel):
    """The ``request`` part of a one-shot multipart submission: the files come as parts."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=128)
    known_triggers: list[dict[str, Any]] = Field(default_factory=list, max_length=16)
    options: dict[str, Any] = Field(default_factory=dict)


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class JobResult(BaseModel):
    verdict: str
    suspected_target: str
    summary: Summary
    artifacts: list[ArtifactOut]


class JobOut(BaseModel):
    id: str
    state: str
    done: bool
    stage: str | None
    progress: float
    attempt: int
    create_time: datetime
    start_time: datetime | None
    update_time: datetime
    end_time: datetime | None
    request: dict[str, Any]
    result: JobResult | None
    error: dict[str, Any] | None


class JobList(BaseModel):
    jobs: list[JobOut]
    next_page_token: str | None


class ArtifactList(BaseModel):
    artifacts: list[ArtifactOut]


class Problem(BaseModel):
    """RFC 9457 problem details, with our stable ``code``."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    request_id: str | None = None


class Check(BaseModel):
    ok: bool
    detail: str
    seconds: float


class Readiness(BaseModel):
    status: str
    checks: dict[str, Check]


PROBLEM_CONTENT = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The errors a route can answer, as ``responses=``. Not ``model=Problem``: FastAPI would
    then document them as ``application/json``, and clients that check the content type (or
    generate code from it) would reject the ``application/problem+json`` we send."""
    return {
        status: {"description": HTTPStatus(status).phrase, "content": PROBLEM_CONTENT}
        for status in statuses
    }
