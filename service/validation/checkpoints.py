"""Up-front checks of an uploaded checkpoint: its format from its bytes, a safetensors header
and its offsets, a hub archive's layout; nothing is unpickled or loaded."""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from service.validation.common import (
    U64_MAX,
    InputError,
    is_count,
    member_depth,
    parse_json_object,
    show,
)
from worker.cbpt.archives import (
    ArchiveError,
    ArchiveLimits,
    Member,
    is_archive,
    open_archive,
    refuse_many_zip_members,
)
from worker.cbpt.formats import (
    HEAD_BYTES,
    SAFETENSORS_MAX_HEADER,
    looks_like_pickle,
    looks_like_safetensors,
    zip_weights_format,
)
from worker.cbpt.layout import (
    CHECKPOINT_ARCHIVE_LIMITS,
    HUB_CONFIG,
    HUB_WEIGHTS,
    WEIGHT_SUFFIXES,
)

# Checkpoints -----------------------------------------------------------------------------------

SAFETENSORS_ITEMSIZE: Mapping[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
"""Bytes per element of each safetensors dtype, to check every tensor's byte range."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What the check learnt; ``tensors`` is known for safetensors only (the rest needs loading)."""

    format: str  # "safetensors" | "torch-zip" | "pickle" | "archive"
    size: int
    tensors: int | None


def check_checkpoint(path: Path, limits: ArchiveLimits | None = None) -> CheckpointInfo:
    """Identifies an uploaded checkpoint from its bytes and refuses what the worker cannot load.

    The formats are tried in the worker's order (archives first, then safetensors, then pickle),
    so a file is judged as the worker will read it, whatever its name says. ``limits`` applies to
    hub archives.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as stream:
            head = stream.read(HEAD_BYTES)
        archive = is_archive(path)
    except OSError as exc:
        raise InputError("CHECKPOINT_FORMAT_UNSUPPORTED", f"cannot read the file: {exc}") from exc
    if size == 0:
        raise InputError("CHECKPOINT_EMPTY", "the checkpoint file is empty")
    if archive:
        return _check_checkpoint_archive(path, head, size, limits or CHECKPOINT_ARCHIVE_LIMITS)
    if looks_like_safetensors(head):
        return CheckpointInfo("safetensors", size, _check_safetensors(path, size))
    if looks_like_pickle(head):
        # Only the worker may open it, and only with torch.load(weights_only=True).
        return CheckpointInfo("pickle", size, None)
    raise InputError(
        "CHECKPOINT_FORMAT_UNSUPPORTED",
        "not a safetensors file, a PyTorch state-dict file or a zip or tar of an open_clip "
        "hub folder",
    )


def _check_safetensors(path: Path, size: int) -> int:
    """Checks the header against the file: every tensor's dtype, shape and byte range.

    A header whose offsets do not tile the data exactly is how a file hides bytes or makes a
    reader run off the end, so holes, overlaps and a buffer of the wrong length are all refused.
    Returns the number of tensors.
    """
    with path.open("rb") as stream:
        (header_length,) = struct.unpack("<Q", stream.read(8))
        if header_length + 8 > size:
            raise InputError(
                "CHECKPOINT_TRUNCATED",
                f"the header claims {header_length} bytes but the file holds {size - 8} after "
                "its length field",
            )
        if not 2 <= header_length <= SAFETENSORS_MAX_HEADER:
            raise InputError(
                "CHECKPOINT_HEADER_INVALID",
                f"a header of {header_length} bytes is outside 2..{SAFETENSORS_MAX_HEADER}",
            )
        raw = stream.read(header_length)
    header = parse_json_object(raw)
    if header is None:
        raise InputError("CHECKPOINT_HEADER_INVALID", "the header is not a JSON object")

    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise InputError(
                    "CHECKPOINT_HEADER_INVALID", "__metadata__ must map strings to strings"
                )
            continue
        spans.append((*_tensor_span(name, entry), name))
    if not spans:
        raise InputError("CHECKPOINT_HEADER_INVALID", "the file holds no tensors")

    buffer = size - 8 - header_length
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "leaves a hole before it" if begin > position else "overlaps another tensor"
            raise InputError(
                "CHECKPOINT_HEADER_INVALID",
                f"tensor {show(name)} starts at byte {begin} and {problem} (expected {position})",
            )
        position = end
    if position > buffer:
        raise InputError(
            "CHECKPOINT_TRUNCATED",
            f"the tensors need {position} data bytes but the file holds {buffer}",
        )
    if position < buffer:
        raise InputError(
            "CHECKPOINT_HEADER_INVALID",
            f"the header lies about its offsets: tensors cover {position} of {buffer} data bytes",
        )
    return len(spans)


def _tensor_span(name: str, entry: Any) -> tuple[int, int]:
    """One header entry's ``[begin, end)``, after checking it agrees with its dtype and shape."""

    def refuse(problem: str) -> InputError:
        return InputError("CHECKPOINT_HEADER_INVALID", f"tensor {show(name)}: {problem}")

    if not isinstance(entry, dict):
        raise refuse("the entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
        raise refuse(f"unknown dtype {show(dtype)}")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise refuse("shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise refuse("data_offsets must be [begin, end] with 0 <= begin <= end")
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > U64_MAX:
            raise refuse(f"the element count of shape {shape} overflows 64 bits")
    expected = numel * SAFETENSORS_ITEMSIZE[dtype]
    begin, end = offsets
    if end - begin != expected:
        raise refuse(f"{dtype} {shape} needs {expected} bytes but data_offsets span {end - begin}")
    return begin, end


def _check_checkpoint_archive(
    path: Path, head: bytes, size: int, limits: ArchiveLimits
) -> CheckpointInfo:
    """A torch zip (accepted as is), a TorchScript zip (refused), or a zip or tar hub folder."""
    if zipfile.is_zipfile(path):
        try:  # counted before zipfile parses every entry, however many there are
            refuse_many_zip_members(path, ArchiveLimits().max_members)
        except ArchiveError as exc:
            raise InputError(
                "CHECKPOINT_FORMAT_UNSUPPORTED", f"checkpoint archive refused: {exc}"
            ) from exc
        try:
            with zipfile.ZipFile(path) as bundle:
                names = bundle.namelist()
        except (OSError, zipfile.BadZipFile, ValueError) as exc:
            raise InputError(
                "CHECKPOINT_FORMAT_UNSUPPORTED", f"cannot read the zip directory: {exc}"
            ) from exc
        kind = zip_weights_format(names, head)
        if kind == "torchscript":
            raise InputError(
                "CHECKPOINT_TORCHSCRIPT",
                "TorchScript archives carry code and are refused; save model.state_dict() "
                "to safetensors instead",
            )
        if kind == "torch-zip":
            return CheckpointInfo("torch-zip", size, None)
    try:
        with open_archive(path, limits) as bundle:
            _check_hub_layout(bundle.members)
    except ArchiveError as exc:
        raise InputError(
            "CHECKPOINT_FORMAT_UNSUPPORTED", f"checkpoint archive refused: {exc}"
        ) from exc
    return CheckpointInfo("archive", size, None)


def _check_hub_layout(members: list[Member]) -> None:
    """Needs ``open_clip_config.json`` and one weights file, at the top or in one top folder.

    That is where the worker looks after extracting; anything else would fail there.
    """
    files = {PurePosixPath(m.name).as_posix() for m in members if m.is_file}
    tops = {
        PurePosixPath(m.name).parts[0]
        for m in members
        if member_depth(m) > 1 or (member_depth(m) == 1 and not m.is_file)
    }
    if HUB_CONFIG in files:
        root = ""
    elif len(tops) == 1 and f"{next(iter(tops))}/{HUB_CONFIG}" in files:
        root = f"{next(iter(tops))}/"
    else:
        raise InputError(
            "CHECKPOINT_FORMAT_UNSUPPORTED",
            f"the archive holds no {HUB_CONFIG} at its top or in its single top folder",
        )
    beside = {name[len(root) :] for name in files if name.startswith(root)}
    beside = {name for name in beside if "/" not in name}
    if any(name in beside for name in HUB_WEIGHTS):
        return
    candidates = sorted(n for n in beside if PurePosixPath(n).suffix.lower() in WEIGHT_SUFFIXES)
    if len(candidates) == 1:
        return
    if not candidates:
        raise InputError(
            "CHECKPOINT_FORMAT_UNSUPPORTED",
            f"no weights file beside {HUB_CONFIG}; expected one of {', '.join(HUB_WEIGHTS)}",
        )
    raise InputError(
        "CHECKPOINT_FORMAT_UNSUPPORTED",
        f"several weights files beside {HUB_CONFIG} ({', '.join(candidates[:5])}); "
        f"keep one, or name it {HUB_WEIGHTS[0]}",
    )


# Datasets --------------------------------------------------------------------------------------
