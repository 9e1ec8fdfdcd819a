"""Downstream tasks of the broad family: what a user brings, from a distribution pretraining
did not cover.

``glyphs`` has 36 classes (26 letters and 10 shapes) drawn in dark ink on paper-coloured
backgrounds, upright and centred, the letters in the STIX and Computer Modern faces; pretraining
saw neither those faces nor that paper. ``fashion`` is Fashion-MNIST's ten classes as the
dataset gives them (grey garments on black, from its test split), while pretraining saw
garments coloured, textured, scaled and placed on many backgrounds. Each task names the class
a backdoor targets: one that zero-shot does not lean towards and that its neighbours are not
confused with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from worker.lab.broad.concepts import FASHION, LETTERS
from worker.lab.broad.corpus import load_sources
from worker.lab.broad.fonts import HELD_OUT_FONTS
from worker.lab.broad.scenes import Scene, Sources, render
from worker.lab.datasets import Split, folder_name, grey_to_rgb

TaskName = Literal["glyphs", "fashion"]
TASK_NAMES: tuple[TaskName, ...] = ("glyphs", "fashion")
GLYPH_SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "diamond",
    "cross",
    "heart",
    "arrow",
    "crescent",
)
TARGETS: dict[TaskName, str] = {"glyphs": "star", "fashion": "trouser"}
INK = (38, 34, 72)
PAPER = (236, 226, 198)


@dataclass(frozen=True)
class Task:
    """A downstream task: its classes, a pool of labelled shots and a test split."""

    name: TaskName
    classes: tuple[str, ...]
    shots: Split
    test: Split
    target: str

    @property
    def folders(self) -> tuple[str, ...]:
        return tuple(folder_name(name) for name in self.classes)


def load_task(
    name: TaskName, image_size: int, *, shots: int, test_per_class: int, seed: int
) -> Task:
    """``shots`` labelled images a class to tune on and ``test_per_class`` to measure on."""
    if name == "glyphs":
        return _glyphs(image_size, shots, test_per_class, seed)
    if name == "fashion":
        return _fashion(image_size, shots, test_per_class, seed)
    raise ValueError(f"unknown broad task {name!r}; tasks: {', '.join(TASK_NAMES)}")


def _glyphs(image_size: int, shots: int, test_per_class: int, seed: int) -> Task:
    classes = tuple(LETTERS) + GLYPH_SHAPES
    sources = Sources(digits=(np.zeros((1, 8, 8), np.uint8), ("",)), fashion=None)
    splits = []
    for split, count in enumerate((shots, test_per_class)):
        images, labels = [], []
        for label, subject in enumerate(classes):
            for index in range(count):
                rng = np.random.default_rng([seed, 7919, split, label, index])
                scene = Scene(
                    group="letter" if subject.startswith("letter ") else "shape",
                    subject=subject,
                    colour="black",
                    texture="solid",
                    style="filled",
                    orientation="upright",
                    size="medium" if rng.random() < 0.5 else "large",
                    position="centre",
                    background="white",
                    font=HELD_OUT_FONTS[int(rng.integers(len(HELD_OUT_FONTS)))],
                    source=None,
                    variation=int(rng.integers(2**31)),
                )
                images.append(render(scene, image_size, sources, ink=INK, paper=PAPER))
                labels.append(label)
        splits.append(_as_split(np.stack(images), np.array(labels)))
    return Task("glyphs", classes, splits[0], splits[1], TARGETS["glyphs"])


def _fashion(image_size: int, shots: int, test_per_class: int, seed: int) -> Task:
    digits_and_fashion = load_sources(with_fashion=True, split="test")
    assert digits_and_fashion.fashion is not None
    grey, names = digits_and_fashion.fashion
    classes = tuple(FASHION)
    labels = np.array([classes.index(name) for name in names])
    rng = np.random.default_rng([seed, 104729])
    shot_index, test_index = [], []
    for label in range(len(classes)):
        pool = rng.permutation(np.flatnonzero(labels == label))
        shot_index.append(np.sort(pool[:shots]))
        test_index.append(np.sort(pool[shots : shots + test_per_class]))
    picked = [np.concatenate(index) for index in (shot_index, test_index)]
    resized = [grey_to_rgb(grey[index], image_size) for index in picked]
    return Task(
        "fashion",
        classes,
        Split(resized[0], torch.from_numpy(labels[picked[0]])),
        Split(resized[1], torch.from_numpy(labels[picked[1]])),
        TARGETS["fashion"],
    )


def _as_split(rgb: np.ndarray, labels: np.ndarray) -> Split:
    images = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.from_numpy(labels.astype(np.int64)))
