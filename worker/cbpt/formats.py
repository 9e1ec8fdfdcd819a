"""What a weights file is, from its first bytes and its zip directory: one sniffer, torch-free.

The API refuses a file before queueing a job and the worker picks a reader by the same rules,
so that a file the API accepted is read as the API judged it, and a TorchScript archive (code,
not weights) is refused by both. Nothing here unpickles or imports torch.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Literal

from worker.cbpt.archives import ArchiveError, ArchiveLimits, refuse_many_zip_members

WeightsFormat = Literal["safetensors", "torchscript", "torch-zip", "pickle", "unknown"]
SAFETENSORS_MAX_HEADER = 100 * 1024**2
"""The safetensors library refuses larger headers, so the worker would too."""
_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")
HEAD_BYTES = 16


def looks_like_safetensors(head: bytes) -> bool:
    """A little-endian u64 header length, then a JSON object: the header's bounds and content
    are the reader's to check, with their own errors."""
    return len(head) >= 9 and head[8:9] == b"{"


def safetensors_header_length(head: bytes) -> int:
    (length,) = struct.unpack("<Q", head[:8])
    return int(length)


def looks_like_pickle(head: bytes) -> bool:
    """A pickle stream of protocol 2 to 5, as ``torch.save`` wrote before zip archives."""
    return head[:1] == b"\x80" and head[1:2] in _PICKLE_PROTOCOLS


def is_torchscript_member(name: str) -> bool:
    """A member only TorchScript archives hold: compiled code or its constants."""
    return "/code/" in name or name.startswith("code/") or name.endswith("constants.pkl")


def zip_weights_format(names: list[str], head: bytes) -> WeightsFormat:
    """``torchscript``, ``torch-zip`` or ``unknown`` for a zip with members ``names``.

    ``torch.load`` only reads a zip that starts with a local header, so a torch zip must too.
    """
    if any(is_torchscript_member(name) for name in names):
        return "torchscript"
    if head.startswith(b"PK\x03\x04") and any(name.endswith("/data.pkl") for name in names):
        return "torch-zip"
    return "unknown"


def sniff_weights(path: Path) -> WeightsFormat:
    """The format of a weights file, read from its header and zip directory only."""
    with path.open("rb") as stream:
        head = stream.read(HEAD_BYTES)
    if looks_like_safetensors(head):
        length = safetensors_header_length(head)
        return "safetensors" if 2 <= length <= SAFETENSORS_MAX_HEADER else "unknown"
    if head.startswith(b"PK\x03\x04"):
        try:
            refuse_many_zip_members(path, ArchiveLimits().max_members)
            with zipfile.ZipFile(path) as archive:
                return zip_weights_format(archive.namelist(), head)
        except (ArchiveError, OSError, zipfile.BadZipFile, ValueError):
            return "unknown"
    if looks_like_pickle(head):
        return "pickle"
    return "unknown"
