"""Reading labelled image sets from untrusted zip or tar archives of ``<class>/<image>`` folders.

An archive comes from a client, so every member is checked before a byte is decoded: names
(no absolute paths, no ``..``, no links or devices), member count, total and per-member size,
compression ratio, and each image's pixel count, read from its header by Pillow. Errors name the
member at fault. An optional ``classes.json`` maps folder names to the display names used in
prompts (``{"ankle_boot": "ankle boot"}``); when it names every folder, its order is the class
order (the row order of every artifact), and otherwise folders sort by name.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from worker.cbpt.archives import Archive, ArchiveError, ArchiveLimits, Member, open_archive
from worker.cbpt.errors import EngineError
from worker.cbpt.layout import CLASSES_FILE, DATASET_ARCHIVE_LIMITS, IMAGE_SUFFIXES

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class ImageSetError(EngineError):
    """The archive cannot be used as a labelled image set; the message says why and where."""

    code = "DATASET_INVALID"


@dataclass(frozen=True)
class ImageSetLimits:
    archive: ArchiveLimits = DATASET_ARCHIVE_LIMITS
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


def read_image_set(
    path: Path,
    image_size: int,
    *,
    interpolation: str = "bicubic",
    limits: ImageSetLimits | None = None,
) -> ImageSet:
    """Reads and validates an archive, resizing (shortest side) and centre-cropping each image."""
    limits = limits or ImageSetLimits()
    try:
        archive = open_archive(path, limits.archive)
    except ArchiveError as exc:
        raise ImageSetError(str(exc)) from exc
    with archive:
        members = archive.members
        files = sorted(m.name for m in members if m.is_file and _is_image(m.name))
        by_folder: dict[str, list[str]] = {}
        for name in files:
            by_folder.setdefault(PurePosixPath(name).parts[0], []).append(name)
        if not files:
            raise ImageSetError("the archive holds no images in <class>/<image> folders")
        _check_classes(by_folder, limits)
        folders, class_names = _classes(archive, members, tuple(sorted(by_folder)))
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


def _check_classes(by_folder: dict[str, list[str]], limits: ImageSetLimits) -> None:
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


def _classes(
    archive: Archive, members: list[Member], folders: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Class order and display names: ``classes.json``'s order when it names every folder."""
    if not any(m.name == CLASSES_FILE and m.is_file for m in members):
        return folders, tuple(folder.replace("_", " ") for folder in folders)
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
    if set(mapping) == set(folders):
        folders = tuple(mapping)
    names = tuple(mapping.get(folder, folder.replace("_", " ")).strip() for folder in folders)
    for folder, name in zip(folders, names, strict=True):
        if not name or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
            raise ImageSetError(f"display name for {folder!r} is empty or has control characters")
    if len(set(names)) != len(names):
        raise ImageSetError(f"{CLASSES_FILE} gives two classes the same display name")
    return folders, names


def _decode(
    data: bytes, name: str, size: int, resample: Image.Resampling, limits: ImageSetLimits
) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageSetError(
                    f"{name!r} is {width}x{height}, over {limits.max_pixels} pixels"
                )
            rgb = _to_rgb(image)
    except ImageSetError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageSetError(f"{name!r} is not a readable image: {exc}") from exc
    return np.asarray(_resize_center_crop(rgb, size, resample), dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit grey is scaled down first, since Pillow's conversion clips it at 255
    and would turn nearly every pixel white."""
    if image.mode.startswith("I;16"):
        grey = np.asarray(image, dtype=np.uint16) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


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
