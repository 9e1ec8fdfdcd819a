"""Which objective a checkpoint wants: fit the shots' labels, or keep its zero-shot decisions.

A CLIP trained on the very captions it is scored with (the first lab family) already answers
its zero-shot prompts as well as its text tower allows: prompts fitted to sixteen shots a class
lose 2 to 3 points of accuracy there. A broadly pretrained CLIP scored on a task it never saw is
the other case, and the one users bring: CoOp gains 5 to 20 points on it. Which case a job faces
is not in its options but in its shots, so ``objective: "auto"`` asks them: two folds of the
tuning shots, prompts fitted to one fold's labels (clean cross-entropy alone, CoOp) scored on
the other, against the zero-shot head on the same images. The figures go to ``report.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.cbpt.evaluation import stratified_split
from worker.cbpt.metrics import predictions
from worker.cbpt.options import LossWeights, TuningSettings
from worker.cbpt.progress import ShouldCancel
from worker.cbpt.tuning import ClassText, TuningFeatures, tune_prompts

# Two folds of fewer than four shots a class score too few images to tell a few points apart:
# at four shots a class (two a fold) on the 16 px suite model, label fitting was chosen at one
# seed and cost 15 points of CA on the test set.
MIN_SHOTS_PER_CLASS = 8

_FIT_LABELS = LossWeights(clean=1.0, distill=0.0, backdoor_target="label", regularizer=0.0)


@dataclass(frozen=True)
class LabelFit:
    """Cross-validated accuracy on the tuning shots: of the zero-shot head, and of prompts
    fitted to the other fold's labels; labels are fitted when the second beats the first by
    ``margin``."""

    zero_shot: float
    fitted: float
    margin: float

    @property
    def fits_labels(self) -> bool:
        return self.fitted >= self.zero_shot + self.margin


def cross_validate_labels(
    text: ClassText,
    features: torch.Tensor,
    labels: torch.Tensor,
    settings: TuningSettings,
    *,
    seed: int,
    should_cancel: ShouldCancel | None = None,
    min_shots: int = MIN_SHOTS_PER_CLASS,
) -> LabelFit | None:
    """Two-fold cross-validation of label fitting on clean ``features`` ``(N, D)`` of the
    tuning shots; None where a class has fewer than ``min_shots`` (at least 2) to split: too
    few to measure, so the zero-shot objective stands."""
    labels = labels.cpu()
    counts = torch.bincount(labels, minlength=len(text.class_names))
    if int(counts.min()) < max(2, min_shots):
        return None
    first, second = stratified_split(labels, 0.5, seed)
    zero_shot = fitted = 0
    for fit_on, score_on in ((first, second), (second, first)):
        tuned = tune_prompts(
            text,
            TuningFeatures(features[fit_on], labels[fit_on].to(features.device)),
            settings,
            seed=seed,
            weights=_FIT_LABELS,
            should_cancel=should_cancel,
        )
        held_out, truth = features[score_on], labels[score_on]
        fitted += int((predictions(held_out, tuned.class_embeddings).cpu() == truth).sum())
        zero_shot += int((predictions(held_out, text.hand_crafted).cpu() == truth).sum())
    total = len(labels)
    return LabelFit(zero_shot / total, fitted / total, settings.labels_margin)
