"""Stage 1 as a job runs it: find the suspected target and a trigger, and say whether the
model is backdoored.

By default (``search.enabled``) every class is searched for a small trigger that reaches it
(``reach.py``). The class reached most easily is the suspected target, and the verdict reads how
much more easily than the next class (``Reach.margin``): a backdoor is a shortcut the model was
taught towards one class, while the universal adversarial patches every model has reach several
classes about as well. Being relative to the model's own classes, the margin transfers to model
families it was not calibrated on, where an absolute threshold on one trigger's strength does
not: on the broad family's clean model, a contrastive trigger of 0.3% of the image flips 30%
of the shots to one letter, and scores 111 against a threshold of 25 calibrated on the first.

With the search off, stage 1 is CBPT's contrastive inversion, which needs no target. Its score
is the share of other classes' images the inverted trigger sends to the class it sends most to,
per unit of mask (``VerdictSettings`` says why). Each restart is judged by that score under
the zero-shot head, and one that reaches ``backdoored_score`` ends the search, so a backdoored
model usually costs one draw and a clean one all of them.
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
from worker.cbpt.reach import Reach, ReachSearch, reach_every_class
from worker.cbpt.zeroshot import FrozenClip, Shots

Verdict = Literal["clean", "suspicious", "backdoored"]


@dataclass(frozen=True)
class Detection:
    """What stage 1 leaves: the trigger stage 2 starts from, the suspected target, the share of
    other classes' tuning images the trigger sends there, and the verdict; with what produced
    them: the class-wise search (``reach``, and the target's ``margin`` over the next class),
    or the contrastive inversion (``inversion``)."""

    trigger: Trigger
    target: int
    flip_rate: float
    verdict: Verdict
    inversion: InversionResult | None = None
    reach: Reach | None = None
    margin: float | None = None

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
    """Stage 1 on ``shots`` under the zero-shot head ``hand``: the class-wise search, or the
    contrastive inversion when the search is off."""
    if options.search.enabled:
        return _search_classes(clip, hand, shots, options, progress, should_cancel)
    inversion, measured = _judged_inversion(clip, hand, shots, options, progress, should_cancel)
    # the winner's target and flip rate are the ones its judge measured, not measured again
    target, flip = measured[inversion.strengths.index(max(inversion.strengths))]
    verdict = verdict_of(flip, inversion.trigger.mask_fraction, options.verdict)
    return Detection(inversion.trigger, target, flip, verdict, inversion=inversion)


def _search_classes(
    clip: FrozenClip,
    hand: torch.Tensor,
    shots: Shots,
    options: PurifyOptions,
    progress: Callable[[float], None] | None,
    should_cancel: ShouldCancel | None,
) -> Detection:
    search = ReachSearch.of(options.search, lr=options.inversion.lr, seed=options.seed)
    reach = reach_every_class(
        clip.model,
        clip.normalizer,
        shots.pixels,
        shots.labels,
        hand,
        clip.logit_scale,
        search,
        progress=progress,
        should_cancel=should_cancel,
    )
    target = reach.best
    flip, margin = float(reach.flip[target]), reach.margin(target)
    verdict = verdict_of_search(flip, margin, options.verdict)
    return Detection(reach.trigger(target), target, flip, verdict, reach=reach, margin=margin)


def verdict_of_search(flip_rate: float, margin: float, settings: VerdictSettings) -> Verdict:
    """The class-wise search's verdict: the target must flip enough images, and be reached
    far more easily than the next class (``Reach.margin``)."""
    if flip_rate < settings.min_flip_rate:
        return "clean"
    if margin >= settings.backdoored_margin:
        return "backdoored"
    if margin >= settings.suspicious_margin:
        return "suspicious"
    return "clean"


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
