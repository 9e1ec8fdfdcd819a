"""Stage 1 as a job runs it: invert a trigger, and say whether the model is backdoored.

The score is the share of other classes' images the inverted trigger sends to the suspected
target, per unit of mask (``VerdictSettings`` says why). Each restart of the inversion is
judged by that score under the zero-shot head, and one that reaches ``backdoored_score`` ends
the search, so a backdoored model usually costs one draw and a clean one all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from worker.cbpt.inversion import (
    InversionResult,
    Judge,
    Trigger,
    flip_statistics,
    invert_trigger,
)
from worker.cbpt.options import PurifyOptions, VerdictSettings
from worker.cbpt.progress import ShouldCancel
from worker.cbpt.zeroshot import FrozenClip, Shots

Verdict = Literal["clean", "suspicious", "backdoored"]


@dataclass(frozen=True)
class Detection:
    """What stage 1 leaves: the strongest trigger, the class it sends images to, the share of
    other classes' tuning images it sends there, and the verdict they make."""

    inversion: InversionResult
    target: int
    flip_rate: float
    verdict: Verdict

    @property
    def trigger(self) -> Trigger:
        return self.inversion.trigger

    @property
    def score(self) -> float:
        return backdoor_score(self.flip_rate, self.trigger.mask_fraction)


def detect(
    clip: FrozenClip,
    hand: torch.Tensor,
    shots: Shots,
    options: PurifyOptions,
    *,
    progress: Callable[[float], None] | None = None,
    should_cancel: ShouldCancel | None = None,
) -> Detection:
    """Inverts a trigger on ``shots`` under the zero-shot head ``hand`` and judges it: the
    winner's target and flip rate are the ones its judge measured, not measured again."""
    inversion, measured = _judged_inversion(clip, hand, shots, options, progress, should_cancel)
    target, flip = measured[inversion.strengths.index(max(inversion.strengths))]
    mask_fraction = inversion.trigger.mask_fraction
    return Detection(inversion, target, flip, verdict_of(flip, mask_fraction, options.verdict))


def _judged_inversion(
    clip: FrozenClip,
    hand: torch.Tensor,
    shots: Shots,
    options: PurifyOptions,
    progress: Callable[[float], None] | None,
    should_cancel: ShouldCancel | None,
) -> tuple[InversionResult, list[tuple[int, float]]]:
    """The inversion, and each restart's target and flip rate, in the order they ran."""
    labels = shots.labels.cpu()
    measured: list[tuple[int, float]] = []

    def strength(trigger: Trigger) -> float:
        target, flip = flip_statistics(
            clip.model, clip.normalizer, hand, shots.pixels, labels, trigger
        )
        measured.append((target, flip))
        return detection_strength(flip, trigger.mask_fraction, options.verdict)

    inversion = invert_trigger(
        clip.model,
        clip.normalizer,
        shots.pixels,
        options.inversion,
        seed=options.seed,
        judge=Judge(strength, options.verdict.backdoored_score),
        progress=progress,
        should_cancel=should_cancel,
    )
    return inversion, measured


def backdoor_score(flip_rate: float, mask_fraction: float) -> float:
    """Images flipped per unit of mask: what the verdict compares with its thresholds."""
    return flip_rate / max(mask_fraction, 1e-6)


def detection_strength(flip_rate: float, mask_fraction: float, settings: VerdictSettings) -> float:
    """How strongly a trigger speaks for a backdoor: its score, or 0 where the verdict's gates
    call it clean. Stage 1's restarts keep the strongest."""
    if _gated(flip_rate, mask_fraction, settings):
        return 0.0
    return backdoor_score(flip_rate, mask_fraction)


def verdict_of(flip_rate: float, mask_fraction: float, settings: VerdictSettings) -> Verdict:
    if _gated(flip_rate, mask_fraction, settings):
        return "clean"
    score = backdoor_score(flip_rate, mask_fraction)
    if score >= settings.backdoored_score:
        return "backdoored"
    if score >= settings.suspicious_score:
        return "suspicious"
    return "clean"


def _gated(flip_rate: float, mask_fraction: float, settings: VerdictSettings) -> bool:
    """A trigger too large or too weak to be a backdoor's, whatever its score."""
    return mask_fraction > settings.max_mask_fraction or flip_rate < settings.min_flip_rate
