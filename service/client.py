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

import builtins
import contextlib
import hashlib
import http
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

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

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})

# Large enough that hashing and syscalls are not the bottleneck, small enough to stay out of the
# way of memory: checkpoints are gigabytes and are never held whole.
_CHUNK = 1 << 20
# A proxy's HTML error page can be long; a message only needs its start.
_MAX_DETAIL = 500


# --------------------------------------------------------------------------------------- errors


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


def _api_error(response: httpx.Response) -> ApiError:
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


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    raise _api_error(response)


# ------------------------------------------------------------------------------------- resources


def _malformed(what: str, data: object) -> AntidoteError:
    return AntidoteError(f"malformed {what} from the service: {str(data)[:_MAX_DETAIL]}")


def _str(data: Mapping[str, Any], key: str, what: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise _malformed(what, data)
    return value


def _int(data: Mapping[str, Any], key: str, what: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _malformed(what, data)
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


def _hex_digest(value: str) -> str:
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
            sha256=_hex_digest(_str(data, "sha256", "file")),
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
            sha256=_hex_digest(_str(data, "sha256", "artifact")),
            url=_opt_str(data.get("url")),
        )


@dataclass(frozen=True)
class Summary:
    """Clean accuracy and attack success rate before and after purification.

    ASR and fidelity are None when the job named no known trigger to measure them against.
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
            raise _malformed("job", data)
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


# ---------------------------------------------------------------------------------------- client


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the service asked us to wait; delta-seconds or an HTTP date, per RFC 9110."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _path(*segments: str) -> str:
    """Quotes every segment so an id can never reach another route (``..``, ``/``, ``?``)."""
    return "/".join(quote(segment, safe="") for segment in segments)


def _json(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        raise _malformed(what, response.text) from None
    if not isinstance(data, dict):
        raise _malformed(what, data)
    return data


class _HashingReader:
    """Feeds a file to the request body chunk by chunk, hashing what it sends.

    The digest is of exactly the bytes that went out, so comparing it with the digest the service
    computed on what came in catches corruption anywhere between the two.
    """

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self._expected = size
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._chunks = self._read()

    def _read(self) -> Iterator[bytes]:
        with self._path.open("rb") as handle:
            # Never past the size announced in Content-Length, even if the file grows meanwhile.
            while self.size < self._expected:
                chunk = handle.read(min(_CHUNK, self._expected - self.size))
                if not chunk:
                    return
                self.sha256.update(chunk)
                self.size += len(chunk)
                yield chunk

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def finish(self) -> None:
        """Hashes whatever a short-circuiting server did not read, so the digest is complete."""
        for _ in self._chunks:
            pass


class AntidoteClient:
    """Synchronous client; one instance holds one connection pool, so reuse it and close it."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"User-Agent": "clip-antidote-client", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url
        self._http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    @classmethod
    def from_env(
        cls,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> AntidoteClient:
        """Reads ``ANTIDOTE_URL`` and ``ANTIDOTE_API_KEY``, keeping keys out of code and argv.

        Explicit arguments win over the environment.
        """
        url = base_url or os.environ.get("ANTIDOTE_URL") or DEFAULT_URL
        key = api_key or os.environ.get("ANTIDOTE_API_KEY") or None
        return cls(url, key, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- files

    def upload(self, path: Path) -> FileRef:
        """Streams a file up; raises IntegrityError if the service stored other bytes."""
        size = path.stat().st_size
        body = _HashingReader(path, size)
        response = self._http.put(
            "/v1/files",
            content=body,
            # An explicit length lets the service refuse an oversized upload before reading it,
            # and avoids chunked encoding, which some proxies in front of it reject.
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        _raise_for_status(response)
        ref = FileRef.from_dict(_json(response, "file"))
        body.finish()
        local = body.sha256.hexdigest()
        if ref.sha256 != local or ref.size != body.size:
            raise IntegrityError(
                f"upload of {path} arrived as {ref.size} bytes, sha256 {ref.sha256}; "
                f"sent {body.size} bytes, sha256 {local}"
            )
        return ref

    # ----------------------------------------------------------------------------------- jobs

    def submit(
        self,
        checkpoint: Path,
        dataset: Path,
        *,
        model: str | None = None,
        model_config: Path | None = None,
        known_triggers: Sequence[Mapping[str, Any]] = (),
        options: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Uploads the inputs and creates the job.

        The POST carries an ``Idempotency-Key`` (a fresh one unless given) and is retried once
        with the same key on a network error: the request may have reached the service before
        the connection broke, and the key makes the service return that job instead of
        starting a second purification.
        """
        checkpoint_ref = self.upload(checkpoint)
        dataset_ref = self.upload(dataset)
        config_ref = self.upload(model_config) if model_config is not None else None
        payload = {
            "checkpoint_file": checkpoint_ref.id,
            "dataset_file": dataset_ref.id,
            "model": model,
            "model_config_file": config_ref.id if config_ref is not None else None,
            "known_triggers": [dict(spec) for spec in known_triggers],
            "options": dict(options or {}),
        }
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        try:
            response = self._http.post("/v1/jobs", json=payload, headers=headers)
        except httpx.TransportError:
            response = self._http.post("/v1/jobs", json=payload, headers=headers)
        _raise_for_status(response)
        return Job.from_dict(_json(response, "job"))

    def get(self, job_id: str) -> Job:
        return self._get(job_id)[0]

    def _get(self, job_id: str) -> tuple[Job, float | None]:
        response = self._http.get("/v1/jobs/" + _path(job_id))
        _raise_for_status(response)
        return Job.from_dict(_json(response, "job")), _retry_after(response)

    def list(self, state: str | None = None, page_size: int | None = None) -> Iterator[Job]:
        """Yields jobs across all pages, fetching each page only when the previous one is used."""
        params: dict[str, str | int] = {}
        if state is not None:
            params["state"] = state
        if page_size is not None:
            params["page_size"] = page_size
        seen: set[str] = set()
        while True:
            response = self._http.get("/v1/jobs", params=params)
            _raise_for_status(response)
            page = _json(response, "job list")
            jobs = page.get("jobs")
            if not isinstance(jobs, builtins.list):
                raise _malformed("job list", page)
            for item in jobs:
                yield Job.from_dict(item)
            token = page.get("next_page_token")
            if not isinstance(token, str) or not token:
                return
            # A token that comes back again would page forever.
            if token in seen:
                raise _malformed("page token (repeated)", token)
            seen.add(token)
            params["page_token"] = token

    def cancel(self, job_id: str) -> Job:
        """Asks for cancellation; the job passes through CANCELLING, so wait() for the end."""
        response = self._http.post("/v1/jobs/" + _path(job_id, "cancel"))
        _raise_for_status(response)
        return Job.from_dict(_json(response, "job"))

    def wait(
        self,
        job_id: str,
        *,
        poll: float = 1.0,
        timeout: float | None = None,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Polls until the job is done and returns it, whatever its outcome.

        A ``Retry-After`` from the service shortens the interval but never stretches it past
        ``poll``: the service's hint is how soon there may be news, the caller's ``poll`` is how
        stale it accepts its view to be. Call ``raise_for_error()`` on the result to treat
        failure as an exception.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job, retry_after = self._get(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.done:
                return job
            interval = poll if retry_after is None else min(retry_after, poll)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(job, timeout or 0.0)
                interval = min(interval, remaining)
            time.sleep(max(0.0, interval))

    # ------------------------------------------------------------------------------ artifacts

    def artifacts(self, job_id: str) -> builtins.list[ArtifactRef]:
        response = self._http.get("/v1/jobs/" + _path(job_id, "artifacts"))
        _raise_for_status(response)
        page = _json(response, "artifact list")
        items = page.get("artifacts")
        if not isinstance(items, builtins.list):
            raise _malformed("artifact list", page)
        return [ArtifactRef.from_dict(item) for item in items]

    def download(self, job_id: str, out_dir: Path) -> builtins.list[Path]:
        """Fetches every artifact of a job into ``out_dir`` and returns their paths.

        Each file is written under a temporary name and renamed only once its SHA-256 and size
        match the listing, so a file with an artifact's name is always a complete, verified one.
        """
        artifacts = self.artifacts(job_id)
        for artifact in artifacts:
            name = artifact.name
            # The name becomes a local path: a hostile or broken service must not escape out_dir.
            if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
                raise IntegrityError(f"refusing artifact name {name!r}")
        out_dir.mkdir(parents=True, exist_ok=True)
        return [self._download_one(job_id, artifact, out_dir) for artifact in artifacts]

    def _download_one(self, job_id: str, artifact: ArtifactRef, out_dir: Path) -> Path:
        # The listing's url is ignored on purpose: the key must only ever go to base_url.
        route = "/v1/jobs/" + _path(job_id, "artifacts", artifact.name)
        target = out_dir / artifact.name
        handle, temp_name = tempfile.mkstemp(
            dir=out_dir, prefix=f".{artifact.name}.", suffix=".part"
        )
        temp = Path(temp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(handle, "wb") as file, self._http.stream("GET", route) as response:
                _raise_for_status(response)
                etag = response.headers.get("ETag", "")
                if etag.startswith('"sha256:') and _hex_digest(etag.strip('"')) != artifact.sha256:
                    raise IntegrityError(
                        f"artifact {artifact.name}: ETag {etag} disagrees with listed sha256 "
                        f"{artifact.sha256}"
                    )
                for chunk in response.iter_bytes(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
            if digest.hexdigest() != artifact.sha256 or size != artifact.size:
                raise IntegrityError(
                    f"artifact {artifact.name}: got {size} bytes, sha256 {digest.hexdigest()}; "
                    f"listed {artifact.size} bytes, sha256 {artifact.sha256}"
                )
            temp.replace(target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return target
