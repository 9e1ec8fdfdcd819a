"""What the report measures: CA, per-class accuracy and every trigger's ASR, before and after.

"Before" is the hand-crafted (zero-shot) head, "after" the purified one, both on the held-out
images and in float32, as ``load_purified_classifier`` deploys the head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.cbpt.attacks import AttackSpec
from worker.cbpt.checkpoint import Preprocess
from worker.cbpt.imagesets import ImageSet, read_image_set
from worker.cbpt.metrics import (
    attack_success_rate,
    clean_accuracy,
    fidelity,
    per_class_accuracy,
    predictions,
)
from worker.cbpt.outcome import Summary, TriggerKind, TriggerMeasurement, summary_of
from worker.cbpt.warps import AnyTrigger
from worker.cbpt.zeroshot import FrozenClip, encode_images


@dataclass(frozen=True)
class Candidate:
    """A trigger the evaluation measures: its name, kind, how to apply it, the class it aims
    at, and its spec when the job named it."""

    name: str
    kind: TriggerKind
    apply: Callable[[torch.Tensor], torch.Tensor]
    target: int
    spec: dict[str, Any] | None = None


@dataclass(frozen=True)
class Evaluation:
    ca_before: float
    ca_after: float
    triggers: list[TriggerMeasurement]
    per_class_before: list[float]
    per_class_after: list[float]

    @property
    def summary(self) -> Summary:
        return summary_of(self.triggers, self.ca_before, self.ca_after)


def candidates(
    inverted: AnyTrigger,
    target: int,
    known: tuple[AttackSpec, ...],
    adaptive: AnyTrigger | None,
    class_names: tuple[str, ...],
) -> list[Candidate]:
    """Stage 1's trigger, then every known one, then the adaptive check's, in report order."""
    found = [Candidate("inverted", "inverted", inverted.apply, target)]
    found += [
        Candidate(
            spec.name,
            "known",
            spec.apply,
            class_names.index(spec.target or ""),
            spec.model_dump(mode="json"),
        )
        for spec in known
    ]
    if adaptive is not None:
        found.append(Candidate("re-inverted", "re-inverted", adaptive.apply, target))
    return found


def evaluate(
    clip: FrozenClip,
    held_out: ImageSet,
    before: torch.Tensor,
    after: torch.Tensor,
    triggers: list[Candidate],
) -> Evaluation:
    """Measures the heads ``before`` and ``after`` ``(C, D)`` on ``held_out``."""
    device = before.device
    labels = held_out.labels
    pixels = held_out.images.to(device)
    clean = encode_images(clip.model, pixels, clip.normalizer)
    predicted_before, predicted_after = predictions(clean, before), predictions(clean, after)
    ca_before = clean_accuracy(predicted_before, labels)
    ca_after = clean_accuracy(predicted_after, labels)
    measured = []
    for trigger in triggers:
        features = encode_images(clip.model, pixels, clip.normalizer, transform=trigger.apply)
        asr_before = attack_success_rate(predictions(features, before), labels, trigger.target)
        asr_after = attack_success_rate(predictions(features, after), labels, trigger.target)
        score = fidelity(asr_before, asr_after, ca_before, ca_after)
        measured.append(
            TriggerMeasurement(
                name=trigger.name,
                kind=trigger.kind,
                target=held_out.class_names[trigger.target],
                spec=trigger.spec,
                asr_before=round(asr_before, 6),
                asr_after=round(asr_after, 6),
                fidelity=None if score is None else round(score, 6),
            )
        )
    n_classes = len(held_out.class_names)
    return Evaluation(
        ca_before,
        ca_after,
        measured,
        [round(v, 6) for v in per_class_accuracy(predicted_before, labels, n_classes)],
        [round(v, 6) for v in per_class_accuracy(predicted_after, labels, n_classes)],
    )


def stratified_split(
    labels: torch.Tensor, holdout_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the tuning and held-out parts: per class, at least one image on each side."""
    generator = torch.Generator().manual_seed(seed)
    tune, held = [], []
    for label in sorted(set(labels.tolist())):
        pool = torch.nonzero(labels == label).flatten()
        pool = pool[torch.randperm(len(pool), generator=generator)]
        if len(pool) < 2:
            raise ValueError(f"class {label} has {len(pool)} image; at least 2 are needed")
        n_held = min(len(pool) - 1, max(1, round(len(pool) * holdout_fraction)))
        held.append(pool[:n_held])
        tune.append(pool[n_held:])
    return torch.cat(tune).sort().values, torch.cat(held).sort().values


def subset(images: ImageSet, index: torch.Tensor) -> ImageSet:
    """The images at ``index``, with their labels and file names."""
    return ImageSet(
        images.images[index],
        images.labels[index],
        images.folders,
        images.class_names,
        tuple(images.files[i] for i in index.tolist()),
    )


def read_evaluation_set(path: Path, like: ImageSet, preprocess: Preprocess) -> ImageSet:
    """A separate held-out set, which must have ``like``'s classes."""
    other = read_image_set(path, preprocess.size, interpolation=preprocess.interpolation)
    if other.class_names != like.class_names:
        raise ValueError("the evaluation set's classes differ from the dataset's")
    return other
