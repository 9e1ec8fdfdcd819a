"""A content-addressed blob store on a local (or shared, for workers) file system.

Bytes are written to a private temp file, hashed while written, fsynced, then renamed into
``sha256/ab/cd/<hex>``; a reader never sees a half-written blob, and a failed or oversized
upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


class BlobTooLargeError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def writer(self, limit: int) -> BlobWriter:
        return BlobWriter(self, limit)

    def put_file(self, source: Path) -> Blob:
        """Copies a finished file (a worker's artifact) into the store."""
        with source.open("rb") as stream, self.writer(limit=2**62) as writer:
            while chunk := stream.read(1024 * 1024):
                writer.write(chunk)
            return writer.commit()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def sweep(self, *, upload_age_s: float, scratch_age_s: float) -> list[Path]:
        """Removes what a killed process left in ``tmp``: half-written uploads and job scratch.

        Ages are generous because other API replicas and workers share the folder: only files
        nobody has touched for that long are taken.
        """
        now = time.time()
        removed: list[Path] = []
        for entry in self.tmp.iterdir():
            try:
                age = now - entry.stat().st_mtime
                if entry.is_dir() and age > scratch_age_s:
                    shutil.rmtree(entry)
                elif entry.is_file() and age > upload_age_s:
                    entry.unlink()
                else:
                    continue
            except FileNotFoundError:  # another replica swept it first
                continue
            removed.append(entry)
        return removed


class BlobWriter:
    """Streams chunks in; ``commit`` publishes them, leaving the context without it discards."""

    def __init__(self, store: BlobStore, limit: int) -> None:
        self._store = store
        self._limit = limit
        self._hash = hashlib.sha256()
        self.size = 0
        fd, name = tempfile.mkstemp(dir=store.tmp, prefix="upload-")
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._temp = Path(name)
        self._done = False

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._limit:
            raise BlobTooLargeError(self._limit)
        self._hash.update(chunk)
        self._file.write(chunk)

    def commit(self) -> Blob:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = self._hash.hexdigest()
        final = self._store.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._temp, final)  # same bytes twice: the second rename is harmless
        self._done = True
        return Blob(digest, self.size)

    def discard(self) -> None:
        if not self._done:
            self._file.close()
            self._temp.unlink(missing_ok=True)
            self._done = True

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()
