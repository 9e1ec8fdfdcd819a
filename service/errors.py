"""RFC 9457 problem details: one error type, one stable ``code`` per failure, one handler.

Codes are UPPER_SNAKE and never change meaning; clients branch on ``code``, people read
``detail``. A job's ``error`` field uses the same shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from worker.cbpt.errors import EngineError

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://clip-antidote.dev/problems/"


class Problem(Exception):  # noqa: N818 - the RFC 9457 name
    """An error with an HTTP status and a stable code; raised anywhere, rendered once."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or code.replace("_", " ").capitalize()
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None, request_id: str | None = None) -> dict[str, Any]:
        return problem_body(
            self.status,
            self.code,
            self.detail,
            title=self.title,
            instance=instance,
            request_id=request_id,
            **self.extra,
        )


def problem_body(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    instance: str | None = None,
    request_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + code.lower().replace("_", "-"),
        "title": title or code.replace("_", " ").capitalize(),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    if request_id:
        body["request_id"] = request_id
    body.update(extra)
    return body


def problem_of(exc: BaseException, *, internal_detail: str | None = None) -> Problem:
    """The one mapping from an error to a problem, for the API and the worker alike.

    An engine or input error keeps its code and status; options that do not validate are
    OPTIONS_INVALID with a pointer per error; anything else is ours, a 500, whose detail is
    ``internal_detail`` where given (the API hides its internals) or the error's own text.
    """
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, EngineError):
        return Problem(exc.status, exc.code, exc.detail)
    if isinstance(exc, ValidationError):
        errors = error_pointers(exc.errors(include_url=False, include_input=False))
        return Problem(422, "OPTIONS_INVALID", "options do not validate", errors=errors)
    if isinstance(exc, MemoryError):
        return Problem(500, "OUT_OF_MEMORY", "the worker ran out of memory")
    return Problem(500, "INTERNAL", internal_detail or f"{type(exc).__name__}: {exc}")


def error_pointers(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Pydantic's validation errors as RFC 9457 ``errors`` items: a JSON pointer and a detail."""
    return [
        {"pointer": "/" + "/".join(str(part) for part in err["loc"]), "detail": str(err["msg"])}
        for err in errors
    ]


def upload_too_large(limit: int) -> Problem:
    return Problem(413, "UPLOAD_TOO_LARGE", f"uploads are capped at {limit} bytes")


def not_found(kind: str, ident: str) -> Problem:
    """The same answer whether the id does not exist or belongs to another tenant."""
    return Problem(404, f"{kind.upper()}_NOT_FOUND", f"no {kind} {ident!r}")
