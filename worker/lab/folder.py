"""A lab folder opened the way the engine opens a job's checkpoint, for the benchmarks' probes.

The benchmarks that measure around a job (the bound on any head, the transfer gap, the oracle
and the stage-2 epoch timing) all need the same things from a folder: the model loaded by
``load_checkpoint`` with its normaliser, the 16 shots and the test set decoded as the
checkpoint's preprocessing says, the zero-shot head, and the implanted attack with its target.
Opening them in one place keeps the probes measuring the same inputs as a job does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from worker.cbpt.attacks import AttackSpec
from worker.cbpt.checkpoint import LoadedCheckpoint, load_checkpoint
from worker.cbpt.imagesets import ImageSet, read_image_set
from worker.cbpt.options import DEFAULT_TEMPLATES
from worker.cbpt.zeroshot import FrozenClip, Normalizer, Shots, class_embeddings
from worker.lab.evaluate import lab_attack


class NotBackdooredError(ValueError):
    """The folder holds no backdoored lab model (no ``attack.json`` with a target)."""


@dataclass(frozen=True)
class LabFolder:
    """What a probe reads from one lab folder; ``attack`` is None for the clean model."""

    directory: Path
    loaded: LoadedCheckpoint
    normalizer: Normalizer
    shots: ImageSet
    test: ImageSet
    hand: torch.Tensor  # (C, D) zero-shot class embeddings with the templates asked for
    attack: AttackSpec | None

    @property
    def model(self) -> open_clip.CLIP:
        return self.loaded.model

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.shots.class_names

    @property
    def logit_scale(self) -> float:
        return float(self.loaded.model.logit_scale.exp())

    @property
    def clip(self) -> FrozenClip:
        return FrozenClip(self.loaded.model, self.normalizer, self.loaded.tokenizer)

    def shot_tensors(self) -> Shots:
        """The few shots as a job tunes on them: pixels in [0, 1] with their labels."""
        return Shots(self.shots.images.float() / 255, self.shots.labels)

    def backdoor(self) -> tuple[AttackSpec, int]:
        """The implanted attack and its target's row, or NotBackdooredError."""
        if self.attack is None or self.attack.target not in self.class_names:
            raise NotBackdooredError(f"{self.directory} holds no backdoored lab model")
        return self.attack, self.class_names.index(self.attack.target)


def open_lab_folder(
    directory: Path,
    *,
    templates: tuple[str, ...] = DEFAULT_TEMPLATES,
    device: torch.device | None = None,
) -> LabFolder:
    """Loads ``directory`` (a folder ``bench/lab.py`` or ``make_lab_model`` wrote)."""
    loaded = load_checkpoint(directory, device=device or torch.device("cpu"))
    preprocess = loaded.preprocess
    shots, test = (
        read_image_set(directory / archive, preprocess.size, interpolation=preprocess.interpolation)
        for archive in ("fewshot.zip", "test.zip")
    )
    if test.class_names != shots.class_names:
        raise ValueError(f"{directory}: fewshot.zip and test.zip hold different classes")
    return LabFolder(
        directory=directory,
        loaded=loaded,
        normalizer=Normalizer(preprocess.mean, preprocess.std),
        shots=shots,
        test=test,
        hand=class_embeddings(loaded.model, loaded.tokenizer, shots.class_names, templates),
        attack=lab_attack(directory),
    )


def backdoored_folders(lab: Path, attacks: str) -> list[tuple[str, Path]]:
    """The folder of each comma-separated attack name under ``lab``, every one checked before
    any is measured: a missing model fails the benchmark at once, not after minutes of others."""
    named = [(name, lab / name) for name in attacks.split(",") if name]
    for _, directory in named:
        if not (directory / "attack.json").is_file():
            raise NotBackdooredError(
                f"{directory} holds no backdoored lab model; run bench/lab.py first"
            )
    return named
