"""Reading labelled image sets from untrusted zip or tar archives of ``<class>/<image>`` folders.

An archive comes from a client, so every member is checked before a byte is decoded: names
(no absolute paths, no ``..``, no links or devices), member count, total and per-member size,
compression ratio, and each image's pixel count, read from its header by Pillow. Errors name the
member at fault. An optional ``classes.json`` maps folder names to the display names used in
prompts (``{"ankle_boot": "ankle boot"}``).
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
CLASSES_FILE = "classes.json"
_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class ImageSetError(ValueError):
    """The archive cannot be used as a labelled image set; the message says why and where."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 100_000
    max_total_bytes: int = 2 * 1024**3
    max_member_bytes: int = 64 * 1024**2
    max_ratio: float = 200.0  # uncompressed / compressed, per member (zip bombs)
    max_pixels: int = 4096 * 4096
    max_classes: int = 1000
    min_classes: int = 2
    min_per_class: int = 1


@dataclass(frozen=True)
class ImageSet:
    """Images ``(N, 3, S, S)`` uint8 at the model size, labels ``(N,)``, classes in label order."""

    images: torch.Tensor
    labels: torch.Tensor
    folders: tuple[str, ...]
    class_names: tuple[str, ...]
    files: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    compressed: int | None
    is_file: bool


def read_image_set(
    path: Path,
    image_size: int,
    *,
    interpolation: str = "bicubic",
    limits: ArchiveLimits | None = None,
) -> ImageSet:
    """Reads and validates an archive, resizing (shortest side) and centre-cropping each image."""
    limits = limits or ArchiveLimits()
    with _open_archive(path) as archive:
        members = archive.members()
        _check_members(members, limits)
        files = sorted(m.name for m in members if m.is_file and _is_image(m.name))
        by_folder: dict[str, list[str]] = {}
        for name in files:
            by_folder.setdefault(PurePosixPath(name).parts[0], []).append(name)
        if not files:
            raise ImageSetError("the archive holds no images in <class>/<image> folders")
        folders = tuple(sorted(by_folder))
        _check_classes(by_folder, limits)
        class_names = _display_names(archive, members, folders)
        resample = _INTERPOLATION.get(interpolation, Image.Resampling.BICUBIC)
        images, labels, names = [], [], []
        for label, folder in enumerate(folders):
            for name in by_folder[folder]:
                images.append(_decode(archive.read(name), name, image_size, resample, limits))
                labels.append(label)
                names.append(name)
    return ImageSet(
        images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        labels=torch.tensor(labels, dtype=torch.int64),
        folders=folders,
        class_names=class_names,
        files=tuple(names),
    )


def _is_image(name: str) -> bool:
    path = PurePosixPath(name)
    return (
        len(path.parts) == 2
        and path.suffix.lower() in IMAGE_SUFFIXES
        and not path.name.startswith(".")
    )


def _check_members(members: list[_Member], limits: ArchiveLimits) -> None:
    if not members:
        raise ImageSetError("the archive is empty")
    if len(members) > limits.max_members:
        raise ImageSetError(
            f"the archive has {len(members)} members, more than {limits.max_members}"
        )
    total = 0
    for member in members:
        path = PurePosixPath(member.name)
        if member.name.startswith("/") or ".." in path.parts or "\\" in member.name:
            raise ImageSetError(f"unsafe member path {member.name!r}")
        if not member.is_file:
            continue
        if member.size > limits.max_member_bytes:
            raise ImageSetError(f"{member.name!r} is {member.size} bytes, over the member limit")
        if member.compressed and member.size / member.compressed > limits.max_ratio:
            raise ImageSetError(
                f"{member.name!r} expands {member.size // member.compressed}x: refused"
            )
        total += member.size
    if total > limits.max_total_bytes:
        raise ImageSetError(f"the archive expands to {total} bytes, over {limits.max_total_bytes}")


def _check_classes(by_folder: dict[str, list[str]], limits: ArchiveLimits) -> None:
    if len(by_folder) < limits.min_classes:
        raise ImageSetError(
            f"found {len(by_folder)} class folder(s); at least {limits.min_classes} needed"
        )
    if len(by_folder) > limits.max_classes:
        raise ImageSetError(f"found {len(by_folder)} class folders, more than {limits.max_classes}")
    for folder, names in sorted(by_folder.items()):
        if len(names) < limits.min_per_class:
            raise ImageSetError(
                f"class {folder!r} has {len(names)} image(s); "
                f"at least {limits.min_per_class} needed"
            )


def _display_names(
    archive: _Archive, members: list[_Member], folders: tuple[str, ...]
) -> tuple[str, ...]:
    if not any(m.name == CLASSES_FILE and m.is_file for m in members):
        return tuple(folder.replace("_", " ") for folder in folders)
    try:
        mapping = json.loads(archive.read(CLASSES_FILE))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageSetError(f"{CLASSES_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise ImageSetError(f"{CLASSES_FILE} must map folder names to display names (strings)")
    unknown = sorted(set(mapping) - set(folders))
    if unknown:
        raise ImageSetError(f"{CLASSES_FILE} names folders that hold no images: {unknown[:5]}")
    names = tuple(mapping.get(folder, folder.replace("_", " ")).strip() for folder in folders)
    for folder, name in zip(folders, names, strict=True):
        if not name or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
            raise ImageSetError(f"display name for {folder!r} is empty or has control characters")
    return names


def _decode(
    data: bytes, name: str, size: int, resample: Image.Resampling, limits: ArchiveLimits
) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageSetError(
                    f"{name!r} is {width}x{height}, over {limits.max_pixels} pixels"
                )
            rgb = image.convert("RGB")
    except ImageSetError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageSetError(f"{name!r} is not a readable image: {exc}") from exc
    return np.asarray(_resize_center_crop(rgb, size, resample), dtype=np.uint8)


def _resize_center_crop(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """open_clip's default preprocessing: resize the shortest side to ``size``, crop the centre."""
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, resample)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


class _Archive:
    def members(self) -> list[_Member]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _ZipArchive(_Archive):
    def __init__(self, path: Path) -> None:
        self._zip = zipfile.ZipFile(path)

    def members(self) -> list[_Member]:
        result = []
        for info in self._zip.infolist():
            mode = info.external_attr >> 16
            is_link = (mode & 0o170000) == 0o120000
            if is_link:
                raise ImageSetError(f"link member {info.filename!r} refused")
            result.append(
                _Member(info.filename, info.file_size, info.compress_size, not info.is_dir())
            )
        return result

    def read(self, name: str) -> bytes:
        return self._zip.read(name)

    def close(self) -> None:
        self._zip.close()


class _TarArchive(_Archive):
    def __init__(self, path: Path) -> None:
        self._tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by __exit__
        self._infos = {info.name: info for info in self._tar.getmembers()}

    def members(self) -> list[_Member]:
        result = []
        for info in self._infos.values():
            if not (info.isfile() or info.isdir()):
                raise ImageSetError(f"member {info.name!r} is a link or device: refused")
            result.append(_Member(info.name, info.size, None, info.isfile()))
        return result

    def read(self, name: str) -> bytes:
        stream = self._tar.extractfile(self._infos[name])
        if stream is None:
            raise ImageSetError(f"{name!r} cannot be read")
        with stream:
            return stream.read()

    def close(self) -> None:
        self._tar.close()


def _open_archive(path: Path) -> _Archive:
    try:
        if zipfile.is_zipfile(path):
            return _ZipArchive(path)
        if tarfile.is_tarfile(path):
            return _TarArchive(path)
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise ImageSetError(f"cannot open the archive: {exc}") from exc
    raise ImageSetError("the dataset must be a zip or tar archive of <class>/<image> folders")
