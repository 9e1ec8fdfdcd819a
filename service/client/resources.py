"""What the service answers with, read defensively: files, artifacts, jobs and their results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.client.errors import JobFailed, malformed

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


def _str(data: Mapping[str, Any], key: str, what: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise malformed(what, data)
    return value


def _int(data: Mapping[str, Any], key: str, what: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise malformed(what, data)
    return value


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _opt_float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _opt_time(value: Any) -> datetime | None:
    """Parses RFC 3339 times, tolerating garbage: a timestamp is never worth failing a poll."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def hex_digest(value: str) -> str:
    return value.removeprefix("sha256:").lower()


@dataclass(frozen=True)
class FileRef:
    """An uploaded file; jobs refer to inputs by ``id`` so one upload can feed many jobs."""

    id: str
    sha256: str
    size: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileRef:
        return cls(
            id=_str(data, "id", "file"),
            sha256=hex_digest(_str(data, "sha256", "file")),
            size=_int(data, "size", "file"),
        )


@dataclass(frozen=True)
class ArtifactRef:
    """One output file of a finished job, with the digest a download is checked against."""

    name: str
    size: int
    sha256: str
    url: str | None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactRef:
        return cls(
            name=_str(data, "name", "artifact"),
            size=_int(data, "size", "artifact"),
            sha256=hex_digest(_str(data, "sha256", "artifact")),
            url=_opt_str(data.get("url")),
        )


@dataclass(frozen=True)
class Summary:
    """Clean accuracy and attack success rate before and after purification, on the job's
    held-out images: ``worker.cbpt.outcome.Summary`` read with the standard library alone.

    The ASR is that of the first known trigger the job named; without one, of a trigger
    re-inverted against the purified head; for a model found clean and left untuned, of the
    inverted trigger. Fidelity is None where there was no attack success to remove.
    """

    ca_before: float | None
    ca_after: float | None
    asr_before: float | None
    asr_after: float | None
    fidelity: float | None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        return cls(
            ca_before=_opt_float(data.get("ca_before")),
            ca_after=_opt_float(data.get("ca_after")),
            asr_before=_opt_float(data.get("asr_before")),
            asr_after=_opt_float(data.get("asr_after")),
            fidelity=_opt_float(data.get("fidelity")),
        )


@dataclass(frozen=True)
class JobResult:
    verdict: str
    suspected_target: str | None
    summary: Summary
    artifacts: tuple[ArtifactRef, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobResult:
        summary = data.get("summary")
        artifacts = data.get("artifacts")
        return cls(
            verdict=_str(data, "verdict", "job result"),
            suspected_target=_opt_str(data.get("suspected_target")),
            summary=Summary.from_dict(summary if isinstance(summary, dict) else {}),
            artifacts=tuple(
                ArtifactRef.from_dict(item)
                for item in (artifacts if isinstance(artifacts, list) else [])
            ),
        )


@dataclass(frozen=True)
class Job:
    """A snapshot of a job; ``raw`` keeps the whole resource, fields this client predates too.

    ``state`` stays a plain string so a state added to the service later does not break
    existing clients; ``done`` is what decides whether to keep polling.
    """

    id: str
    state: str
    stage: str | None
    progress: float
    attempt: int
    create_time: datetime | None
    start_time: datetime | None
    update_time: datetime | None
    end_time: datetime | None
    request: dict[str, Any]
    result: JobResult | None
    error: dict[str, Any] | None
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, data: Any) -> Job:
        if not isinstance(data, dict):
            raise malformed("job", data)
        attempt = data.get("attempt")
        request = data.get("request")
        result = data.get("result")
        error = data.get("error")
        return cls(
            id=_str(data, "id", "job"),
            state=_str(data, "state", "job"),
            stage=_opt_str(data.get("stage")),
            progress=_opt_float(data.get("progress")) or 0.0,
            attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0,
            create_time=_opt_time(data.get("create_time")),
            start_time=_opt_time(data.get("start_time")),
            update_time=_opt_time(data.get("update_time")),
            end_time=_opt_time(data.get("end_time")),
            request=request if isinstance(request, dict) else {},
            result=JobResult.from_dict(result) if isinstance(result, dict) else None,
            error=error if isinstance(error, dict) else None,
            raw=data,
        )

    @property
    def done(self) -> bool:
        """The service's own ``done`` flag wins, so states unknown to this client still end."""
        flag = self.raw.get("done")
        if isinstance(flag, bool):
            return flag
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.done and self.state == "SUCCEEDED" and self.error is None

    def raise_for_error(self) -> Job:
        """Turns a finished-but-unsuccessful job into an exception; returns self to chain."""
        if self.state in ("FAILED", "CANCELLED") or (self.done and self.error is not None):
            raise JobFailed(self)
        return self
