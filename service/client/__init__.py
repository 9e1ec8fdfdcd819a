"""Python client for the clip-antidote service.

A job is a purification of one uploaded checkpoint with one uploaded few-shot dataset. The client
uploads the inputs, submits the job, polls it and fetches the purified artifacts, checking every
byte it sends or receives against the SHA-256 the service reports, so that a truncated upload or
download can never pass for a good one.

Every failure the client raises derives from one base class::

    AntidoteError                  anything this client raises on purpose
    +-- ApiError                   the service answered with an error status
    |   +-- ClientError            4xx: the request must change before it can succeed
    |   |   +-- InvalidRequest     400, 422: malformed or semantically invalid input
    |   |   +-- Unauthorized       401: missing or wrong API key
    |   |   +-- NotFound           404: no such job, file or artifact
    |   |   +-- Conflict           409: the job's state does not allow the operation
    |   |   +-- PayloadTooLarge    413: an upload is over the service's size limit
    |   +-- ServerError            5xx: the service failed; the same request may succeed later
    +-- IntegrityError             bytes sent or received do not match their SHA-256 or size
    +-- JobFailed                  a finished job FAILED or was CANCELLED (Job.raise_for_error)
    +-- WaitTimeout                wait() gave up before the job finished

Network failures are not wrapped: they surface as ``httpx.TransportError``, which callers that
retry already know how to handle.

Example::

    with AntidoteClient.from_env() as client:
        job = client.submit(Path("model.safetensors"), Path("fewshot.zip"), model="ViT-B-32")
        job = client.wait(job.id).raise_for_error()
        paths = client.download(job.id, Path("purified"))
"""

from __future__ import annotations

from service.client.api import DEFAULT_URL, AntidoteClient
from service.client.errors import (
    AntidoteError,
    ApiError,
    ClientError,
    Conflict,
    IntegrityError,
    InvalidRequest,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
    WaitTimeout,
)
from service.client.resources import (
    TERMINAL_STATES,
    ArtifactRef,
    FileRef,
    Job,
    JobResult,
    Summary,
)

__all__ = [
    "DEFAULT_URL",
    "TERMINAL_STATES",
    "AntidoteClient",
    "AntidoteError",
    "ApiError",
    "ArtifactRef",
    "ClientError",
    "Conflict",
    "FileRef",
    "IntegrityError",
    "InvalidRequest",
    "Job",
    "JobFailed",
    "JobResult",
    "NotFound",
    "PayloadTooLarge",
    "ServerError",
    "Summary",
    "Unauthorized",
    "WaitTimeout",
]
