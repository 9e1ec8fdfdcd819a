"""``AntidoteClient``: upload, submit, poll, download, every byte checked against its SHA-256."""

from __future__ import annotations

import builtins
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from service.client.errors import (
    IntegrityError,
    WaitTimeout,
    malformed,
    raise_for_status,
)
from service.client.resources import ArtifactRef, FileRef, Job, hex_digest

DEFAULT_URL = "http://127.0.0.1:8000"
# Large enough that hashing and syscalls are not the bottleneck, small enough to stay out of the
# way of memory: checkpoints are gigabytes and are never held whole.
_CHUNK = 1 << 20


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
        raise malformed(what, response.text) from None
    if not isinstance(data, dict):
        raise malformed(what, data)
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
        raise_for_status(response)
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
        raise_for_status(response)
        return Job.from_dict(_json(response, "job"))

    def get(self, job_id: str) -> Job:
        return self._get(job_id)[0]

    def _get(self, job_id: str) -> tuple[Job, float | None]:
        response = self._http.get("/v1/jobs/" + _path(job_id))
        raise_for_status(response)
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
            raise_for_status(response)
            page = _json(response, "job list")
            jobs = page.get("jobs")
            if not isinstance(jobs, builtins.list):
                raise malformed("job list", page)
            for item in jobs:
                yield Job.from_dict(item)
            token = page.get("next_page_token")
            if not isinstance(token, str) or not token:
                return
            # A token that comes back again would page forever.
            if token in seen:
                raise malformed("page token (repeated)", token)
            seen.add(token)
            params["page_token"] = token

    def cancel(self, job_id: str) -> Job:
        """Asks for cancellation; the job passes through CANCELLING, so wait() for the end."""
        response = self._http.post("/v1/jobs/" + _path(job_id, "cancel"))
        raise_for_status(response)
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
        raise_for_status(response)
        page = _json(response, "artifact list")
        items = page.get("artifacts")
        if not isinstance(items, builtins.list):
            raise malformed("artifact list", page)
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
                raise_for_status(response)
                etag = response.headers.get("ETag", "")
                if etag.startswith('"sha256:') and hex_digest(etag.strip('"')) != artifact.sha256:
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
