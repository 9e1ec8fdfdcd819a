"""Opening untrusted zip and tar archives: every member is vetted before a byte is read.

Clients upload datasets and checkpoint folders as archives, so names (no absolute paths, no
``..``, no backslashes), member kinds (regular files and folders only: no links or devices),
member count, per-member and total size, and the compression ratio (zip bombs) are all checked
up front, from the archive's directory alone.
"""

from __future__ import annotations

import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from worker.cbpt.errors import EngineError


class ArchiveError(EngineError):
    """The archive is unreadable or unsafe; the message names the member at fault."""

    code = "DATASET_UNSAFE"


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 100_000
    max_total_bytes: int = 2 * 1024**3
    max_member_bytes: int = 2 * 1024**3
    max_ratio: float = 200.0  # uncompressed / compressed, per member


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    compressed: int | None  # None where the format does not say (tar)
    is_file: bool


class Archive:
    """A vetted archive: ``members`` passed every check, ``read`` returns one member's bytes."""

    members: list[Member]

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def extract(self, destination: Path) -> None:
        """Writes every file member under ``destination`` (names were vetted on opening)."""
        for member in self.members:
            if member.is_file:
                target = destination.joinpath(*PurePosixPath(member.name).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.read(member.name))


def open_archive(path: Path, limits: ArchiveLimits | None = None) -> Archive:
    """Opens a zip or tar (optionally compressed) archive and vets its members."""
    limits = limits or ArchiveLimits()
    try:
        if zipfile.is_zipfile(path):
            refuse_many_zip_members(path, limits.max_members)
            archive: Archive = _ZipArchive(path)
        elif tarfile.is_tarfile(path):
            archive = _TarArchive(path, limits)
        else:
            raise ArchiveError("not a zip or tar archive")
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise ArchiveError(f"cannot open the archive: {exc}") from exc
    try:
        _check(archive.members, limits)
    except ArchiveError:
        archive.close()
        raise
    return archive


def is_archive(path: Path) -> bool:
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


_ZIP_END = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")  # the fixed part zipfile reads
_ZIP_CENTRAL_SIGNATURE = b"PK\x01\x02"


def refuse_many_zip_members(path: Path, max_members: int) -> None:
    """Counts a zip's central directory entries from its raw bytes, before ``zipfile`` does.

    ``zipfile`` builds an object per entry (tens of microseconds each) before the count can be
    looked at, and it walks the directory by its size, not by the count the end record declares:
    a few megabytes of empty members would hold the API for seconds. Counting entry signatures
    stops just past the limit instead. A name holding the signature can only over-count, which
    refuses the archive that carries it.
    """
    with path.open("rb") as stream:
        start, end = _zip_directory_span(stream)
        stream.seek(start)
        count, carry, left = 0, b"", end - start
        while left > 0 and count <= max_members:
            chunk = stream.read(min(left, 1024**2))
            if not chunk:
                break
            left -= len(chunk)
            window = carry + chunk
            count += window.count(_ZIP_CENTRAL_SIGNATURE)
            carry = window[-(len(_ZIP_CENTRAL_SIGNATURE) - 1) :]
    if count > max_members:
        raise ArchiveError(f"the archive has more than {max_members} members")


def _zip_directory_span(stream: BinaryIO) -> tuple[int, int]:
    """Where the central directory lies, from the end records (zip64 ones included)."""
    size = stream.seek(0, 2)
    tail_start = max(0, size - _ZIP_END.size - 0xFFFF)  # the record, then a comment
    stream.seek(tail_start)
    tail = stream.read()
    at = len(tail) - _ZIP_END.size  # where it is when there is no comment, as zipfile looks
    if not (tail[at : at + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _ZIP_END.size > len(tail):
        return 0, 0  # zipfile will not read it either, and says so itself
    directory_size = _ZIP_END.unpack_from(tail, at)[5]
    end = tail_start + at
    locator = at - _ZIP64_LOCATOR.size
    if locator >= _ZIP64_END.size and tail[locator : locator + 4] == b"PK\x06\x07":
        # As zipfile reads it: the zip64 record sits just before its locator.
        record = tail[locator - _ZIP64_END.size : locator]
        if record[:4] == b"PK\x06\x06":
            directory_size = _ZIP64_END.unpack(record)[8]
            end = tail_start + locator - _ZIP64_END.size
    return max(0, end - directory_size), end


def _check(members: list[Member], limits: ArchiveLimits) -> None:
    if not members:
        raise ArchiveError("the archive is empty")
    if len(members) > limits.max_members:
        raise ArchiveError(
            f"the archive has {len(members)} members, more than {limits.max_members}"
        )
    total = 0
    for member in members:
        parts = PurePosixPath(member.name).parts
        if (
            member.name.startswith("/")
            or ".." in parts
            or "\\" in member.name
            or ":" in member.name
        ):
            raise ArchiveError(f"unsafe member path {member.name!r}")
        if not member.is_file:
            continue
        if member.size > limits.max_member_bytes:
            raise ArchiveError(f"{member.name!r} is {member.size} bytes, over the member limit")
        if member.compressed and member.size / member.compressed > limits.max_ratio:
            raise ArchiveError(
                f"{member.name!r} expands {member.size // member.compressed}x: refused"
            )
        total += member.size
    if total > limits.max_total_bytes:
        raise ArchiveError(f"the archive expands to {total} bytes, over {limits.max_total_bytes}")


class _ZipArchive(Archive):
    def __init__(self, path: Path) -> None:
        self._zip = zipfile.ZipFile(path)
        self.members = []
        for info in self._zip.infolist():
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                self._zip.close()
                raise ArchiveError(f"link member {info.filename!r} refused")
            self.members.append(
                Member(info.filename, info.file_size, info.compress_size, not info.is_dir())
            )

    def read(self, name: str) -> bytes:
        return self._zip.read(name)

    def close(self) -> None:
        self._zip.close()


class _TarArchive(Archive):
    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        self._tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by close()
        self._infos: dict[str, tarfile.TarInfo] = {}
        # Read lazily: a tar has no directory, so reaching the next header means reading (and
        # decompressing) everything before it. The scan stops at the limits rather than work
        # through whatever the upload holds; _check names an oversized member.
        for count, info in enumerate(self._tar, start=1):
            if count > limits.max_members:
                self._tar.close()
                raise ArchiveError(f"the archive has more than {limits.max_members} members")
            self._infos[info.name] = info
            if info.size > limits.max_member_bytes:
                break
        self.members = []
        for info in self._infos.values():
            if not (info.isfile() or info.isdir()):
                self._tar.close()
                raise ArchiveError(f"member {info.name!r} is a link or device: refused")
            self.members.append(Member(info.name, info.size, None, info.isfile()))

    def read(self, name: str) -> bytes:
        stream = self._tar.extractfile(self._infos[name])
        if stream is None:
            raise ArchiveError(f"{name!r} cannot be read")
        with stream:
            return stream.read()

    def close(self) -> None:
        self._tar.close()
