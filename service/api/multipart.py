"""A streaming multipart reader for the one-shot job submission.

Starlette's form parser spools file parts to the system temp dir with no size cap before the
route runs; this one feeds each file part straight into a blob writer under the upload cap and
keeps only the small JSON part in memory. File parts stay temp files until ``commit``: a body
that breaks off, crosses the cap or fails validation leaves no blob that nothing refers to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from service.blobs import Blob, BlobStore, BlobTooLargeError, BlobWriter
from service.errors import Problem, upload_too_large

FILE_PARTS = ("checkpoint", "dataset", "model_config")
JSON_PART = "request"
MAX_JSON_BYTES = 1024 * 1024


class MultipartUpload:
    """Collects ``request`` (bytes) and file parts (temp files, ``blobs`` once committed)."""

    def __init__(self, content_type: str, store: BlobStore, limit: int) -> None:
        kind, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise Problem(415, "UNSUPPORTED_MEDIA_TYPE", "use application/json or multipart")
        self._store = store
        self._limit = limit
        self.blobs: dict[str, Blob] = {}
        self.parts: dict[str, BlobWriter] = {}  # complete file parts, not yet published
        self.request = b""
        self._writers: list[BlobWriter] = []
        self._header_field = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._writer: BlobWriter | None = None
        self._error: Problem | None = None
        callbacks: Any = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        self._parser = MultipartParser(boundary, callbacks)

    async def read(self, stream: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in stream:
                self._parser.write(chunk)
                if self._error:
                    raise self._error
            self._parser.finalize()
            if self._error:
                raise self._error
        except BlobTooLargeError as exc:
            self.discard()
            raise upload_too_large(self._limit) from exc
        except Problem:
            self.discard()
            raise
        except Exception as exc:  # the parser's own errors: a malformed body
            self.discard()
            raise Problem(400, "MULTIPART_INVALID", f"malformed multipart body: {exc}") from exc

    def commit(self) -> dict[str, Blob]:
        """Publishes the file parts into the blob store; call it once the request is valid."""
        for name, writer in self.parts.items():
            self.blobs[name] = writer.commit()
        return self.blobs

    def discard(self) -> None:
        """Drops every temp file not yet committed; harmless after ``commit``."""
        for writer in self._writers:
            writer.discard()

    def _part_begin(self) -> None:
        self._headers, self._header_field, self._name, self._writer = {}, b"", None, None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        key = self._header_field.lower()
        self._headers[key] = self._headers.get(key, b"") + data[start:end]

    def _header_end(self) -> None:
        self._header_field = b""

    def _headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"")
        _, params = parse_options_header(disposition)
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name not in (*FILE_PARTS, JSON_PART):
            self._error = Problem(400, "MULTIPART_INVALID", f"unexpected part {name!r}")
            return
        if name in self.parts or (name == JSON_PART and self.request):
            self._error = Problem(400, "MULTIPART_INVALID", f"part {name!r} sent twice")
            return
        self._name = name
        if name in FILE_PARTS:
            self._writer = self._store.writer(self._limit)
            self._writers.append(self._writer)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._error or self._name is None:
            return
        if self._writer is not None:
            self._writer.write(data[start:end])
        else:
            self.request += data[start:end]
            if len(self.request) > MAX_JSON_BYTES:
                self._error = Problem(413, "REQUEST_TOO_LARGE", "the request part is over 1 MiB")

    def _part_end(self) -> None:
        if self._error or self._name is None:
            return
        if self._writer is not None:
            self.parts[self._name] = self._writer
