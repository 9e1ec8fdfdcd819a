"""Opening untrusted zip and tar archives: every member is vetted before a byte is read.

Clients upload datasets and checkpoint folders as archives, so names (no absolute paths, no
``..``, no backslashes), member kinds (regular files and folders only: no links or devices),
member count, per-member and total size, and the compression ratio (zip bombs) are all checked
up front, from the archive's directory alone.
"""

from __future__ import annotations

import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


class ArchiveError(ValueError):
    """The archive is unreadable or unsafe; the message names the member at fault."""


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
            archive: Archive = _ZipArchive(path)
        elif tarfile.is_tarfile(path):
            archive = _TarArchive(path)
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
    def __init__(self, path: Path) -> None:
        self._tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by close()
        self._infos = {info.name: info for info in self._tar.getmembers()}
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
