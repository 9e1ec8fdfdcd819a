"""What the client raises: one base, one class per kind of failure (see ``service.client``)."""

from __future__ import annotations

import contextlib
import http
import json
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:  # a job is what JobFailed and WaitTimeout carry
    from service.client.resources import Job

# A proxy's HTML error page can be long; a message only needs its start.
_MAX_DETAIL = 500


class AntidoteError(Exception):
    """Base of everything the client raises deliberately, so callers can catch one type."""


class ApiError(AntidoteError):
    """The service answered with an error status.

    The service speaks RFC 9457 problem details; anything else (a proxy's HTML page, a bare
    framework error) is mapped onto the same attributes so callers never parse bodies themselves.
    ``code`` is the stable, machine-readable part to branch on; ``detail`` is for people.
    """

    def __init__(
        self, status: int, code: str, title: str, detail: str, problem: dict[str, Any]
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.problem = problem


class ClientError(ApiError):
    """4xx: retrying the same request cannot help."""


class InvalidRequest(ClientError):  # noqa: N818 - named after the HTTP status or outcome
    """400 or 422."""


class Unauthorized(ClientError):  # noqa: N818 - named after the HTTP status or outcome
    """401."""


class NotFound(ClientError):  # noqa: N818 - named after the HTTP status or outcome
    """404."""


class Conflict(ClientError):  # noqa: N818 - named after the HTTP status or outcome
    """409."""


class PayloadTooLarge(ClientError):  # noqa: N818 - named after the HTTP status or outcome
    """413."""


class ServerError(ApiError):
    """5xx: the service or something in front of it failed; a later retry may succeed."""


class IntegrityError(AntidoteError):
    """Bytes do not match the SHA-256 or size they were announced with; nothing was kept."""


class JobFailed(AntidoteError):  # noqa: N818 - named after the HTTP status or outcome
    """A job ended without a result; carries the job so its problem object stays reachable."""

    def __init__(self, job: Job) -> None:
        problem = job.error or {}
        self.job = job
        self.code = str(problem.get("code") or job.state)
        self.detail = str(problem.get("detail") or problem.get("title") or f"job {job.state}")
        super().__init__(f"job {job.id} {job.state}: {self.code}: {self.detail}")


class WaitTimeout(AntidoteError):  # noqa: N818 - named after the HTTP status or outcome
    """The wait ran out; the job itself keeps running and can be waited on again."""

    def __init__(self, job: Job, timeout: float) -> None:
        self.job = job
        self.timeout = timeout
        super().__init__(
            f"job {job.id} still {job.state} ({job.stage or 'no stage'}, "
            f"{job.progress:.0%}) after {timeout:g} s"
        )


_ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
}


def _error_class(status: int) -> type[ApiError]:
    if status in _ERRORS_BY_STATUS:
        return _ERRORS_BY_STATUS[status]
    if 400 <= status < 500:
        return ClientError
    if 500 <= status < 600:
        return ServerError
    return ApiError


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _fallback_code(status: int) -> str:
    """A code for bodies without one, in the service's style: ``NOT_FOUND``, ``BAD_GATEWAY``."""
    try:
        return http.HTTPStatus(status).name
    except ValueError:
        return f"HTTP_{status}"


def _render_detail(detail: Any) -> str:
    """Flattens the list form of validation errors that some frameworks return as ``detail``."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list) and all(isinstance(item, dict) for item in detail):
        parts = []
        for item in detail:
            location = ".".join(str(part) for part in item.get("loc", ()))
            message = str(item.get("msg", item))
            parts.append(f"{location}: {message}" if location else message)
        return "; ".join(parts)
    return json.dumps(detail)


def api_error(response: httpx.Response) -> ApiError:
    """Builds the error for a response already read into memory."""
    status = response.status_code
    body: Any = None
    with contextlib.suppress(ValueError):
        body = response.json()
    if isinstance(body, dict):
        problem: dict[str, Any] = dict(body)
    else:
        text = response.text.strip()[:_MAX_DETAIL] if response.content else ""
        problem = {"type": "about:blank", "title": _reason(status), "status": status}
        if text:
            problem["detail"] = text
    title = problem.get("title")
    title = title if isinstance(title, str) and title else _reason(status)
    detail = _render_detail(problem["detail"]) if problem.get("detail") else title
    code = problem.get("code")
    code = code if isinstance(code, str) and code else _fallback_code(status)
    return _error_class(status)(status, code, title, detail, problem)


def raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    raise api_error(response)


def malformed(what: str, data: object) -> AntidoteError:
    return AntidoteError(f"malformed {what} from the service: {str(data)[:_MAX_DETAIL]}")
