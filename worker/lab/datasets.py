"""Offline image sources for the lab: Debian's Fashion-MNIST and scikit-learn's digits.

Both are small grey-scale sets that install without touching a model hub. Images are kept as
``uint8`` tensors ``(N, 3, S, S)`` at the lab model's input size: the same 8-bit pixels a client
would upload as PNG, so what the lab trains on and what it writes out agree exactly.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

DatasetName = Literal["fashion-mnist", "digits"]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Prompt words, not the dataset's labels: "a photo of a t-shirt." reads better than "T-shirt/top".
_FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class DatasetUnavailableError(RuntimeError):
    """The requested offline dataset is not installed on this machine."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset: RGB ``uint8`` images at the model size and their class indices."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class LabDataset:
    name: DatasetName
    classes: tuple[str, ...]
    train: Split
    test: Split

    @property
    def folders(self) -> tuple[str, ...]:
        """File-system-safe folder names, one per class, in class order."""
        return tuple(folder_name(name) for name in self.classes)


def folder_name(class_name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "_", class_name.lower()).strip("_")


def fashion_mnist_available(root: Path = FASHION_MNIST_DIR) -> bool:
    return (root / "train-images-idx3-ubyte.gz").is_file()


def load_dataset(name: DatasetName, image_size: int, *, seed: int = 0) -> LabDataset:
    """Loads a lab dataset with images resized to ``image_size`` and made RGB.

    ``seed`` only matters for digits, which ships without a test split and is split here.
    """
    if name == "fashion-mnist":
        return _fashion_mnist(image_size)
    if name == "digits":
        return _digits(image_size, seed)
    raise ValueError(f"unknown lab dataset {name!r}")


def default_dataset() -> DatasetName:
    """Fashion-MNIST where Debian's package is installed, digits everywhere else."""
    return "fashion-mnist" if fashion_mnist_available() else "digits"


def _fashion_mnist(image_size: int, root: Path = FASHION_MNIST_DIR) -> LabDataset:
    if not fashion_mnist_available(root):
        raise DatasetUnavailableError(
            f"Fashion-MNIST not found under {root}: install Debian's dataset-fashion-mnist "
            "package (make fashion-mnist), or use --dataset digits"
        )
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        splits.append(_split(images, labels, image_size))
    return LabDataset("fashion-mnist", _FASHION_CLASSES, splits[0], splits[1])


def _digits(image_size: int, seed: int) -> LabDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, bunch.target, test_size=0.3, stratify=bunch.target, random_state=seed
    )
    return LabDataset(
        "digits",
        _DIGIT_CLASSES,
        _split(train_x, train_y, image_size),
        _split(test_x, test_y, image_size),
    )


def _split(grey: np.ndarray, labels: np.ndarray, image_size: int) -> Split:
    labels_tensor = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return Split(grey_to_rgb(grey, image_size), labels_tensor)


def grey_to_rgb(grey: np.ndarray, image_size: int) -> torch.Tensor:
    """``(N, H, W)`` uint8 grey images as ``(N, 3, S, S)`` uint8 RGB, resized with antialiasing."""
    images = torch.from_numpy(np.ascontiguousarray(grey)).float().unsqueeze(1) / 255
    images = F.interpolate(
        images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
    )
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (the MNIST family's format): magic, dimensions, then raw uint8 data."""
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims).copy()  # writable: torch refuses read-only buffers
