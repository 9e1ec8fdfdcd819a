"""Up-front checks of an uploaded dataset archive: its members, class folders, names and
``classes.json``; no image is decoded."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from service.validation.common import (
    InputError,
    parse_json_object,
    show,
)
from worker.cbpt.archives import (
    Archive,
    ArchiveError,
    ArchiveLimits,
    Member,
    is_archive,
    open_archive,
)
from worker.cbpt.layout import (
    CLASSES_FILE,
    DATASET_ARCHIVE_LIMITS,
    IMAGE_SUFFIXES,
)

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


@dataclass(frozen=True)
class DatasetInfo:
    """The class folders in label order (``classes.json``'s when it names them all, else sorted)."""

    classes: tuple[str, ...]
    images: int
    per_class: dict[str, int]


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
                f"class {show(folder)} has {per_class[folder]} image(s); "
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
                    f"{show(member.name)} is a subfolder; images go directly in <class>/ folders",
                )
            per_class.setdefault(_class_name(parts[0]), 0)
            continue
        suffix = PurePosixPath(member.name).suffix.lower()
        if suffix in ARCHIVE_SUFFIXES:
            raise InputError(
                "DATASET_NOT_IMAGE",
                f"{show(member.name)} is an archive inside the archive; nested archives are "
                "not opened, so upload the inner one itself",
            )
        if len(parts) == 1:
            if parts[0] == CLASSES_FILE:
                classes_member = member
                continue
            raise InputError(
                "DATASET_LAYOUT",
                f"{show(member.name)} sits at the top; only {CLASSES_FILE} may, and every "
                "image goes in a <class>/ folder",
            )
        if len(parts) > 2:
            raise InputError(
                "DATASET_LAYOUT",
                f"{show(member.name)} is in a subfolder; images go directly in <class>/ folders",
            )
        if suffix not in IMAGE_SUFFIXES:
            raise InputError(
                "DATASET_NOT_IMAGE",
                f"{show(member.name)} is not an image; accepted: "
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
            raise InputError("DATASET_UNSAFE", f"{show(name)} appears twice in the archive")
        seen.add(name)


def _refuse_wrapper_folder(members: list[Member]) -> None:
    """Names the commonest packing mistake (zipping the parent folder) instead of a bare path."""
    files = [PurePosixPath(m.name).parts for m in members if m.is_file]
    tops = {parts[0] for parts in files}
    if len(tops) == 1 and files and all(len(parts) > 2 for parts in files):
        top = next(iter(tops))
        raise InputError(
            "DATASET_LAYOUT",
            f"everything sits inside one folder {show(top)}; archive the class folders "
            "themselves so that the archive holds <class>/<image>",
        )


def _class_name(folder: str) -> str:
    if len(folder) > MAX_NAME_CHARS or _has_control(folder):
        raise InputError(
            "DATASET_CLASS_NAME",
            f"class folder {show(folder)} is longer than {MAX_NAME_CHARS} characters or holds "
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
        mapping = parse_json_object(bundle.read(member.name))
    except ArchiveError as exc:
        raise refuse(str(exc)) from exc
    if mapping is None:
        raise refuse('must be a JSON object such as {"ankle_boot": "ankle boot"}')
    unknown = sorted(set(mapping) - set(folders))
    if unknown:
        raise refuse(f"names folders that hold no images: {', '.join(map(show, unknown[:5]))}")
    display: dict[str, str] = {}
    for folder, name in mapping.items():
        if not isinstance(name, str):
            raise refuse(f"the display name for {show(folder)} is not a string")
        stripped = name.strip()
        if not 1 <= len(stripped) <= MAX_NAME_CHARS or _has_control(stripped):
            raise refuse(
                f"the display name for {show(folder)} must be 1 to {MAX_NAME_CHARS} "
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


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)
