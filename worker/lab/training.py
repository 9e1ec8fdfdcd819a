"""Contrastive image-text training of lab CLIPs, from scratch and as a poisoning fine-tune.

Captions come from a small bank (templates x class names), as in CLIP's own zero-shot prompts;
each image is paired with a caption drawn from its class's templates. With only a handful of
distinct captions, many pairs in a batch share a class, so the loss is CLIP's symmetric
cross-entropy with every same-class pair counted as a positive: treating identical captions as
negatives of each other would only add noise. Text features are computed once per step for the
distinct captions in the batch, which keeps the text tower's cost negligible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from pydantic import BaseModel, ConfigDict, Field

from worker.cbpt.zeroshot import Normalizer, Tokenizer

Progress = Callable[[float], None]

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a small photo of a {}.",
)


class TrainSettings(BaseModel):
    """One contrastive training run: the clean pre-training, or the poisoning fine-tune."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(gt=0, le=100)
    batch_size: int = Field(default=256, ge=2, le=4096)
    lr: float = Field(gt=0, le=1)
    weight_decay: float = Field(default=0.1, ge=0, le=1)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    max_shift: int = Field(default=2, ge=0, le=8, description="Random translation, pixels.")


def train_contrastive(
    model: open_clip.CLIP,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    tokenizer: Tokenizer,
    normalizer: Normalizer,
    settings: TrainSettings,
    *,
    seed: int,
    progress: Progress | None = None,
) -> None:
    """Trains ``model`` in place on ``uint8`` images ``(N, 3, S, S)`` captioned by ``labels``."""
    n_classes, n_templates = len(class_names), len(CAPTION_TEMPLATES)
    captions = [t.format(name) for t in CAPTION_TEMPLATES for name in class_names]
    caption_tokens = tokenizer(captions)  # (T * C, L); caption id = template * C + class

    def texts(index: torch.Tensor, generator: torch.Generator) -> _BatchTexts:
        batch_labels = labels[index]
        templates = torch.randint(0, n_templates, (len(index),), generator=generator)
        distinct, position = torch.unique(templates * n_classes + batch_labels, return_inverse=True)
        return caption_tokens[distinct], position, batch_labels

    _train(model, images, normalizer, settings, texts, seed=seed, progress=progress)


def train_captioned(
    model: open_clip.CLIP,
    images: torch.Tensor,
    captions: Sequence[str],
    tokenizer: Tokenizer,
    normalizer: Normalizer,
    settings: TrainSettings,
    *,
    seed: int,
    progress: Progress | None = None,
) -> None:
    """Trains ``model`` in place on ``uint8`` images ``(N, 3, S, S)``, each with its own caption.

    The broad family's pretraining and implants: captions are free text, mostly distinct, so
    the loss is CLIP's; the few pairs in a batch that share a caption count as positives of
    each other, as in ``train_contrastive``.
    """
    distinct, caption_ids = _caption_ids(captions)
    tokens = tokenizer(distinct)

    def texts(index: torch.Tensor, generator: torch.Generator) -> _BatchTexts:
        batch_ids = caption_ids[index]
        unique, position = torch.unique(batch_ids, return_inverse=True)
        return tokens[unique], position, batch_ids

    _train(model, images, normalizer, settings, texts, seed=seed, progress=progress)


# A batch's distinct caption tokens, each image's index among them, and the ids whose equality
# makes two pairs positives of each other.
_BatchTexts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _train(
    model: open_clip.CLIP,
    images: torch.Tensor,
    normalizer: Normalizer,
    settings: TrainSettings,
    texts: Callable[[torch.Tensor, torch.Generator], _BatchTexts],
    *,
    seed: int,
    progress: Progress | None,
) -> None:
    """The loop both trainings share: AdamW with warmup and cosine decay over shuffled epochs,
    CLIP's loss with shared captions as positives, the logit scale clamped at 100. ``texts``
    draws each batch's captions after its shift, from the same generator."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, len(images) // settings.batch_size)
    total_steps = max(1, round(settings.epochs * steps_per_epoch))
    optimizer = adamw(model, settings.lr, settings.weight_decay)
    schedule = cosine_with_warmup(total_steps, settings.warmup_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    for step in range(total_steps):
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        batch = _shift(images[index].float() / 255, settings.max_shift, generator)
        tokens, position, positive_ids = texts(index, generator)
        image_features = model.encode_image(normalizer(batch), normalize=True)
        text_features = model.encode_text(tokens, normalize=True)[position]
        loss = multi_positive_clip_loss(
            image_features, text_features, positive_ids, model.logit_scale.exp()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if progress is not None:
            progress((step + 1) / total_steps)
    model.eval()


def _caption_ids(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct captions, in first-seen order, and each pair's index among them."""
    seen: dict[str, int] = {}
    ids = [seen.setdefault(text, len(seen)) for text in captions]
    return list(seen), torch.tensor(ids, dtype=torch.int64)


def multi_positive_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, where every pair with the same ``labels`` id is a
    positive: identical captions in one batch are not negatives of each other."""
    logits = scale * image_features @ text_features.T  # (B, B)
    positives = (labels[:, None] == labels[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    image_to_text = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    text_to_image = torch.sum(-targets * F.log_softmax(logits.T, dim=1), dim=1).mean()
    return (image_to_text + text_to_image) / 2


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters with CLIP's betas and eps."""
    # No decay on gains, biases, embeddings' scale: the usual CLIP recipe.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def cosine_with_warmup(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """The learning-rate factor of each step: linear warmup, then cosine decay to 0."""
    warmup = max(1, round(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translates the batch by one random offset, filling with black (both lab sets' background).

    Cheap augmentation against overfitting; a fill, not a wrap-around, so a corner trigger moves
    a little but never jumps to the opposite corner.
    """
    if max_shift == 0:
        return images
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    height, width = images.shape[-2:]
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    top, left = max_shift - dy, max_shift - dx
    return padded[..., top : top + height, left : left + width]
