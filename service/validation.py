"""Up-front checks on uploaded checkpoints and datasets, so that bad input gets a 4xx, not a job.

The API runs these before it queues anything: a job that can only fail should fail while the
client is still waiting for the answer, with a stable code it can act on. Everything here reads
headers and archive directories only (no unpickling, no tensor loading, no image decoding), so it
is cheap, cannot execute anything an upload holds, and keeps torch out of the API process.

The rules follow what the worker will accept later (``worker.cbpt.checkpoint`` and
``worker.cbpt.imagesets``), sometimes more strictly, never more loosely: passing here does not
promise the job succeeds, but failing here means it could not have.
"""

from __future__ import annotations

import json
import struct
import unicodedata
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from worker.cbpt.archives import (
    Archive,
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
    CLASSES_FILE,
    DATASET_ARCHIVE_LIMITS,
    HUB_CONFIG,
    HUB_WEIGHTS,
    IMAGE_SUFFIXES,
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

_U64_MAX = 2**64 - 1
"""Dimensions, offsets and element counts are u64 in safetensors; bounding them here also keeps
a hostile header from making the element count an enormous number to multiply."""

# Datasets --------------------------------------------------------------------------------------

CLASSES_FILE_MAX_BYTES = 1024**2
"""A thousand classes with long display names fit in a fraction of this."""

ARCHIVE_SUFFIXES = frozenset(
    {".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".zst", ".7z", ".rar"}
)
"""Archives inside the dataset are never opened, so they are refused rather than ignored."""

MAX_NAME_CHARS = 80
"""Longest class folder or display name: names end up in prompts, logs and report tables."""

_OS_DEBRIS = frozenset({"thumbs.db", "desktop.ini"})
"""Files that file managers add on their own; the worker skips them, so refusing them would only
punish clients for how their operating system zips folders."""


class InputError(ValueError):
    """An upload is refused; ``code`` is stable (clients branch on it), ``detail`` is for people."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class CheckpointInfo:
    """What the check learnt; ``tensors`` is known for safetensors only (the rest needs loading)."""

    format: str  # "safetensors" | "torch-zip" | "pickle" | "archive"
    size: int
    tensors: int | None


@dataclass(frozen=True)
class DatasetInfo:
    """The class folders in label order (``classes.json``'s when it names them all, else sorted)."""

    classes: tuple[str, ...]
    images: int
    per_class: dict[str, int]


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
    header = _parse_json_object(raw)
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
                f"tensor {_show(name)} starts at byte {begin} and {problem} (expected {position})",
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
        return InputError("CHECKPOINT_HEADER_INVALID", f"tensor {_show(name)}: {problem}")

    if not isinstance(entry, dict):
        raise refuse("the entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
        raise refuse(f"unknown dtype {_show(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise refuse("shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise refuse("data_offsets must be [begin, end] with 0 <= begin <= end")
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > _U64_MAX:
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
        if _depth(m) > 1 or (_depth(m) == 1 and not m.is_file)
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


def check_dataset(
    path: Path,
    *,
    limits: ArchiveLimits | None = None,
    min_per_class: int = 2,
    max_classes: int = 1000,
) -> DatasetInfo:
    """Checks a ``<class>/<image>`` archive from its directory alone, without decoding images.

    Pixels are left to the worker; what is checked here is everything a client gets wrong when
    packing: the archive itself, the folder layout, file kinds, class counts and names, and
    ``classes.json``.
    """
    try:
        size = path.stat().st_size
        archive = size > 0 and is_archive(path)
    except OSError as exc:
        raise InputError("DATASET_NOT_ARCHIVE", f"cannot read the file: {exc}") from exc
    if size == 0:
        raise InputError("DATASET_EMPTY", "the dataset file is empty")
    if not archive:
        raise InputError("DATASET_NOT_ARCHIVE", "the dataset must be a zip or tar archive")
    try:
        bundle = open_archive(path, limits or DATASET_ARCHIVE_LIMITS)
    except ArchiveError as exc:
        if str(exc) == "the archive is empty":
            raise InputError("DATASET_EMPTY", "the archive holds nothing") from exc
        raise InputError("DATASET_UNSAFE", str(exc)) from exc
    with bundle:
        per_class, classes_member = _scan_members(bundle.members)
        images = sum(per_class.values())
        if images == 0:
            raise InputError("DATASET_EMPTY", "the archive holds no images in class folders")
        if len(per_class) < 2:
            raise InputError(
                "DATASET_TOO_FEW_CLASSES",
                f"found {len(per_class)} class folder(s); at least 2 are needed",
            )
        if len(per_class) > max_classes:
            raise InputError(
                "DATASET_TOO_MANY_CLASSES",
                f"found {len(per_class)} class folders, more than {max_classes}",
            )
        classes = tuple(sorted(per_class))
        if classes_member is not None:
            classes = _check_classes_file(bundle, classes_member, classes)
    for folder in classes:
        if per_class[folder] < min_per_class:
            raise InputError(
                "DATASET_CLASS_TOO_SMALL",
                f"class {_show(folder)} has {per_class[folder]} image(s); "
                f"at least {min_per_class} are needed",
            )
    return DatasetInfo(classes=classes, images=images, per_class={c: per_class[c] for c in classes})


def _scan_members(members: list[Member]) -> tuple[dict[str, int], Member | None]:
    """Images per class folder, and the ``classes.json`` member if there is one.

    Folder entries at the top count as classes even when empty: an empty class is a packing
    mistake worth reporting, not a class to drop silently.
    """
    kept = sorted((m for m in members if not _is_debris(m)), key=lambda m: m.name)
    _refuse_duplicates(PurePosixPath(m.name).as_posix() for m in kept if m.is_file)
    _refuse_wrapper_folder(kept)
    per_class: dict[str, int] = {}
    classes_member: Member | None = None
    for member in kept:
        parts = PurePosixPath(member.name).parts
        if not parts:
            continue  # the archive's own "./" entry
        if not member.is_file:
            if len(parts) > 1:
                raise InputError(
                    "DATASET_LAYOUT",
                    f"{_show(member.name)} is a subfolder; images go directly in <class>/ folders",
                )
            per_class.setdefault(_class_name(parts[0]), 0)
            continue
        suffix = PurePosixPath(member.name).suffix.lower()
        if suffix in ARCHIVE_SUFFIXES:
            raise InputError(
                "DATASET_NOT_IMAGE",
                f"{_show(member.name)} is an archive inside the archive; nested archives are "
                "not opened, so upload the inner one itself",
            )
        if len(parts) == 1:
            if parts[0] == CLASSES_FILE:
                classes_member = member
                continue
            raise InputError(
                "DATASET_LAYOUT",
                f"{_show(member.name)} sits at the top; only {CLASSES_FILE} may, and every "
                "image goes in a <class>/ folder",
            )
        if len(parts) > 2:
            raise InputError(
                "DATASET_LAYOUT",
                f"{_show(member.name)} is in a subfolder; images go directly in <class>/ folders",
            )
        if suffix not in IMAGE_SUFFIXES:
            raise InputError(
                "DATASET_NOT_IMAGE",
                f"{_show(member.name)} is not an image; accepted: "
                f"{', '.join(sorted(IMAGE_SUFFIXES))}",
            )
        folder = _class_name(parts[0])
        per_class[folder] = per_class.get(folder, 0) + 1
    return per_class, classes_member


def _is_debris(member: Member) -> bool:
    """Hidden files, macOS resource forks and thumbnail caches: the worker skips them too."""
    parts = PurePosixPath(member.name).parts
    return bool(parts) and (
        parts[0] == "__MACOSX"
        or any(part.startswith(".") for part in parts)
        or (member.is_file and parts[-1].lower() in _OS_DEBRIS)
    )


def _refuse_duplicates(names: Iterable[str]) -> None:
    """Two members with one name: which one a reader gets depends on the reader, so neither."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError("DATASET_UNSAFE", f"{_show(name)} appears twice in the archive")
        seen.add(name)


def _refuse_wrapper_folder(members: list[Member]) -> None:
    """Names the commonest packing mistake (zipping the parent folder) instead of a bare path."""
    files = [PurePosixPath(m.name).parts for m in members if m.is_file]
    tops = {parts[0] for parts in files}
    if len(tops) == 1 and files and all(len(parts) > 2 for parts in files):
        top = next(iter(tops))
        raise InputError(
            "DATASET_LAYOUT",
            f"everything sits inside one folder {_show(top)}; archive the class folders "
            "themselves so that the archive holds <class>/<image>",
        )


def _class_name(folder: str) -> str:
    if len(folder) > MAX_NAME_CHARS or _has_control(folder):
        raise InputError(
            "DATASET_CLASS_NAME",
            f"class folder {_show(folder)} is longer than {MAX_NAME_CHARS} characters or holds "
            "control characters",
        )
    return folder


def _check_classes_file(
    bundle: Archive, member: Member, folders: tuple[str, ...]
) -> tuple[str, ...]:
    """Validates ``classes.json`` as the worker reads it; returns the class order it implies."""

    def refuse(problem: str) -> InputError:
        return InputError("DATASET_CLASSES_JSON", f"{CLASSES_FILE}: {problem}")

    if member.size > CLASSES_FILE_MAX_BYTES:
        raise refuse(f"{member.size} bytes, over {CLASSES_FILE_MAX_BYTES}")
    try:
        mapping = _parse_json_object(bundle.read(member.name))
    except ArchiveError as exc:
        raise refuse(str(exc)) from exc
    if mapping is None:
        raise refuse('must be a JSON object such as {"ankle_boot": "ankle boot"}')
    unknown = sorted(set(mapping) - set(folders))
    if unknown:
        raise refuse(f"names folders that hold no images: {', '.join(map(_show, unknown[:5]))}")
    display: dict[str, str] = {}
    for folder, name in mapping.items():
        if not isinstance(name, str):
            raise refuse(f"the display name for {_show(folder)} is not a string")
        stripped = name.strip()
        if not 1 <= len(stripped) <= MAX_NAME_CHARS or _has_control(stripped):
            raise refuse(
                f"the display name for {_show(folder)} must be 1 to {MAX_NAME_CHARS} "
                "characters without control characters"
            )
        display[folder] = stripped
    names = [display.get(folder, folder.replace("_", " ").strip()) for folder in folders]
    if not all(names):
        raise refuse("a folder without a display name would get an empty one; name it here")
    if len(set(names)) != len(names):
        raise refuse("two classes have the same display name")
    return tuple(mapping) if set(mapping) == set(folders) else folders


# Shared ----------------------------------------------------------------------------------------


def _parse_json_object(raw: bytes) -> dict[str, Any] | None:
    """A JSON object, or None for anything else: bad UTF-8, bad JSON, repeated keys, deep nesting.

    Repeated keys are refused because readers disagree on which value wins.
    """

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("repeated key")
        return result

    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=no_repeats)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _is_count(value: object) -> bool:
    """A non-negative integer that fits the u64 the safetensors format stores."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64_MAX


def _depth(member: Member) -> int:
    return len(PurePosixPath(member.name).parts)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def _show(value: object) -> str:
    """A quoted, bounded rendering of client-supplied text for error details."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."
