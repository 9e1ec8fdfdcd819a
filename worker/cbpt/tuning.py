"""Stage 2: class-wise prompt tuning on cached image features, encoders frozen.

Three losses, as docs/engine.md reads CBPT, in one of two objectives (``LossWeights``):

1. clean: cross-entropy of the predictions on clean images
   ``logit_scale * cos(f(x), g(prompt_c))`` against the true class (objective "labels", CBPT's
   own), or the KL divergence from the zero-shot (hand-crafted) predictions ("zero-shot");
2. backdoor: triggered images ``f(T(x))`` must be classified as their clean versions should
   be: cross-entropy against the true class ("labels"), or the KL divergence from the
   zero-shot prediction of the *clean* image ("zero-shot");
3. a regulariser keeping each class's text feature near its hand-crafted prompt's feature.

Which objective: where the checkpoint's zero-shot head is already the best its text tower
allows (a model trained on the very captions it is scored with), fitting a few shots' labels
only pulls the prompts towards those shots, and distillation keeps the clean decisions while
the backdoor term moves the prompts. Where it is not (a broadly pretrained CLIP scored on a new
task), fitting labels gains accuracy, as CoOp does. ``objective.py`` tells the two apart on the
shots themselves.

Image features never change during this stage, so they are computed once by the caller (for a
fixed set of views) and each step runs only the text tower on C prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from worker.cbpt.options import LossWeights, TuningSettings
from worker.cbpt.progress import CancelledError
from worker.cbpt.prompts import ClassPrompts, Tokenizer, encode_prompts, prompt_class_embeddings


@dataclass(frozen=True)
class ClassText:
    """The text side tuning works in: the frozen CLIP with its tokenizer, the class names, and
    their hand-crafted embeddings ``(C, D)``, which teach the clean terms and anchor the
    regulariser."""

    model: open_clip.CLIP
    tokenizer: Tokenizer
    class_names: tuple[str, ...]
    hand_crafted: torch.Tensor


@dataclass(frozen=True)
class TuningFeatures:
    """What tuning fits on, computed once: clean image features ``(N, D)`` with their labels,
    and the triggered ones, blocks of the same images in the same order, one per trigger (none
    for plain CoOp)."""

    clean: torch.Tensor
    clean_labels: torch.Tensor
    triggered: torch.Tensor | None = None
    triggered_labels: torch.Tensor | None = None


@dataclass(frozen=True)
class TuningResult:
    prompts: ClassPrompts
    class_embeddings: torch.Tensor  # (C, D), L2-normalised, from the tuned prompts
    final_loss: float


class TuningObjective:
    """The three losses of a set of class embeddings ``(C, D)``, whatever produces them: the
    prompts here, or the free linear head the efficacy benchmark fits as a ceiling.
    ``weights`` settles the objective; by default, what ``settings`` says of a model whose
    zero-shot head is kept."""

    def __init__(
        self,
        logit_scale: float,
        hand_crafted: torch.Tensor,
        features: TuningFeatures,
        settings: TuningSettings,
        *,
        target: int | None = None,
        weights: LossWeights | None = None,
    ) -> None:
        self.scale, self.hand_crafted, self.settings = logit_scale, hand_crafted, settings
        self.weights = weights = weights or settings.loss_weights(False)
        clean_features, clean_labels = features.clean, features.clean_labels
        triggered_features, triggered_labels = features.triggered, features.triggered_labels
        self.clean_features, self.clean_labels = clean_features, clean_labels
        self.clean_weights = _clean_weights(clean_labels, target, settings.target_clean_weight)
        self.teacher = torch.softmax(logit_scale * clean_features @ hand_crafted.T, dim=1)
        self.backdoor: tuple[torch.Tensor, torch.Tensor] | None = None
        if (
            triggered_features is not None
            and triggered_labels is not None
            and settings.backdoor_weight
        ):
            if weights.backdoor_target == "label":
                targets = F.one_hot(triggered_labels, hand_crafted.shape[0]).float()
            else:
                targets = self.teacher.repeat(_blocks(triggered_features, clean_features), 1)
            shifted = _shifted(triggered_features, clean_features, settings.shift_scales)
            self.backdoor = (shifted, targets.repeat(len(settings.shift_scales), 1))

    def __call__(self, text: torch.Tensor) -> torch.Tensor:
        settings, scale, terms = self.settings, self.scale, self.weights
        clean_logits = scale * self.clean_features @ text.T
        per_image = self.clean_weights
        loss = terms.clean * _weighted_mean(
            F.cross_entropy(clean_logits, self.clean_labels, reduction="none"), per_image
        )
        if terms.distill > 0:
            loss = loss + terms.distill * _weighted_mean(
                _soft_cross_entropies(clean_logits, self.teacher), per_image
            )
        if self.backdoor is not None:
            features, targets = self.backdoor
            loss = loss + settings.backdoor_weight * _soft_cross_entropy(
                scale * features @ text.T, targets
            )
        if terms.regularizer > 0:
            drift = 1 - (text * self.hand_crafted).sum(dim=1)
            loss = loss + terms.regularizer * drift.mean()
        return loss


def tune_prompts(
    text: ClassText,
    features: TuningFeatures,
    settings: TuningSettings,
    *,
    seed: int,
    target: int | None = None,
    weights: LossWeights | None = None,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> TuningResult:
    """Tunes one context per class. ``target`` is the suspected target class, whose clean
    images the clean terms weight by ``settings.target_clean_weight``; ``weights`` is the
    objective (``TuningObjective``).

    Without triggered features (or with a zero backdoor weight), clean cross-entropy alone is
    plain CoOp with class-specific contexts: the "prompt tuning without inversion" baseline.
    """
    torch.manual_seed(seed)
    model = text.model
    prompts = ClassPrompts(
        model,
        text.tokenizer,
        text.class_names,
        n_ctx=settings.n_ctx,
        init=settings.context_init,
        seed=seed,
    ).to(features.clean.device)
    optimizer = torch.optim.Adam(prompts.parameters(), lr=settings.lr)
    objective = TuningObjective(
        float(model.logit_scale.detach().exp()),
        text.hand_crafted,
        features,
        settings,
        target=target,
        weights=weights,
    )
    loss = torch.tensor(0.0)
    for step in range(settings.steps):
        if should_cancel is not None and should_cancel():
            raise CancelledError("cancelled during prompt tuning")
        loss = objective(encode_prompts(model, prompts(), prompts.tokens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if progress is not None:
            progress((step + 1) / settings.steps)
    embeddings = prompt_class_embeddings(model, prompts)
    return TuningResult(prompts, embeddings, loss.item())


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against target distributions: the KL divergence plus their constant
    entropy, so the gradients are the KL's."""
    return _soft_cross_entropies(logits, targets).mean()


def _soft_cross_entropies(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy against its target distribution."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)


def _clean_weights(labels: torch.Tensor, target: int | None, weight: float) -> torch.Tensor | None:
    """Per-image weights of the clean terms, or None when every image weighs 1."""
    if target is None or weight == 1:
        return None
    return torch.where(labels == target, weight, 1.0).to(torch.float32)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``values`` with each scaled by its weight: a weight above 1 adds to one
    class's pull without taking from the others'."""
    return values.mean() if weights is None else (values * weights).mean()


def _shifted(triggered: torch.Tensor, clean: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """The triggered features with their shift from the clean ones scaled by each of ``scales``,
    renormalised, one copy per scale (a scale of 1 is the features as they are)."""
    if tuple(scales) == (1.0,):
        return triggered
    origin = clean.repeat(_blocks(triggered, clean), 1)
    shift = triggered - origin
    return torch.cat([F.normalize(origin + scale * shift, dim=1) for scale in scales])


def _blocks(triggered: torch.Tensor, clean: torch.Tensor) -> int:
    """How many triggered copies of the clean images there are; each takes their teacher."""
    blocks, rest = divmod(triggered.shape[0], clean.shape[0])
    if rest or not blocks:
        raise ValueError(
            f"{triggered.shape[0]} triggered features are not whole blocks of the "
            f"{clean.shape[0]} clean images"
        )
    return blocks
