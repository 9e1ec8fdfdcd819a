"""The weight-tuning baseline: what a team could do instead of CBPT with the same few shots.

CleanCLIP (Bansal et al., 2023) purifies a poisoned CLIP by fine-tuning its weights on clean
data with two losses: the multimodal contrastive loss of CLIP, and a unimodal self-supervised
loss that pulls two augmentations of each image together and pushes the others away, so that
the features stop leaning on the trigger alone. Here it runs on the job's shots, each captioned
with the hand-crafted templates ("a photo of a {}."): both towers are tuned, the head is then
the tuned text tower's encoding of the same templates.

Two departures from the paper, both forced by the few-shot setting: the captions are the class
templates, so the text side has no augmentation of its own to pull together (its unimodal term
is left out), and the augmentations are those that keep a glyph's identity (zoom, shift and
colour jitter, no flip). The benchmarks compare it with CBPT on the same shots and seeds
(``bench/efficacy.py``); nothing in a job runs it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from pydantic import BaseModel, ConfigDict, Field

from worker.cbpt.options import DEFAULT_TEMPLATES
from worker.cbpt.zeroshot import Normalizer, Shots, Tokenizer
from worker.lab.training import adamw, cosine_with_warmup, multi_positive_clip_loss


class FinetuneSettings(BaseModel):
    """One fine-tuning run on the shots; the defaults are the benchmark's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=150, ge=1, le=100_000)
    batch_size: int = Field(default=64, ge=2, le=4096)
    lr: float = Field(default=1e-4, gt=0, le=1)
    weight_decay: float = Field(default=0.1, ge=0, le=1)
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    unimodal_weight: float = Field(
        default=1.0, ge=0, description="Weight of the image-image self-supervised term."
    )
    tau: float = Field(default=0.1, gt=0, le=10, description="Its InfoNCE temperature.")
    max_zoom: float = Field(default=1.25, ge=1, le=2)
    jitter: float = Field(default=0.2, ge=0, le=1, description="Brightness and contrast, ±.")


def finetune_on_shots(
    model: open_clip.CLIP,
    normalizer: Normalizer,
    tokenizer: Tokenizer,
    shots: Shots,
    class_names: Sequence[str],
    settings: FinetuneSettings,
    *,
    seed: int,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    progress: Callable[[float], None] | None = None,
) -> open_clip.CLIP:
    """A fine-tuned copy of ``model`` (``model`` itself is untouched), in eval mode.

    ``shots`` holds pixels in [0, 1] and their labels. Each step draws a batch, takes two
    augmented views, and minimises CLIP's loss between the first view and its class caption
    plus ``unimodal_weight`` times the InfoNCE between the two views.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model).requires_grad_(True)  # checkpoints load frozen
    device = next(tuned.parameters()).device
    pixels, labels = shots.pixels.to(device), shots.labels.to(device)
    captions = [template.format(name) for template in templates for name in class_names]
    tokens = tokenizer(captions).to(device)  # caption id = template * C + class
    optimizer = adamw(tuned, settings.lr, settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(settings.steps, settings.warmup_fraction)
    )
    batch = min(settings.batch_size, pixels.shape[0])
    tuned.train()
    for step in range(settings.steps):
        index = torch.randperm(pixels.shape[0], generator=generator)[:batch].to(device)
        images, batch_labels = pixels[index], labels[index]
        first, second = (_augment(images, settings, generator) for _ in range(2))
        features = tuned.encode_image(normalizer(first), normalize=True)
        template = torch.randint(0, len(templates), (batch,), generator=generator).to(device)
        distinct, position = torch.unique(
            template * len(class_names) + batch_labels, return_inverse=True
        )
        text = tuned.encode_text(tokens[distinct], normalize=True)[position]
        loss = multi_positive_clip_loss(features, text, batch_labels, tuned.logit_scale.exp())
        if settings.unimodal_weight:
            other = tuned.encode_image(normalizer(second), normalize=True)
            loss = loss + settings.unimodal_weight * _nt_xent(features, other, settings.tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            tuned.logit_scale.clamp_(0, math.log(100))
        if progress is not None:
            progress((step + 1) / settings.steps)
    return tuned.eval()


def _nt_xent(first: torch.Tensor, second: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's loss over two views of one batch: each view's positive is the other view of
    the same image, its negatives every other image of the other view."""
    logits = first @ second.T / tau
    targets = torch.arange(first.shape[0], device=first.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _augment(
    images: torch.Tensor, settings: FinetuneSettings, generator: torch.Generator
) -> torch.Tensor:
    """A random zoom-and-shift of each image (inside its own frame, so nothing is padded) and a
    random brightness and contrast; no flip, which would change a letter into another."""
    size = images.shape[0]
    zoom = 1 + torch.rand(size, generator=generator) * (settings.max_zoom - 1)
    margin = 1 - 1 / zoom
    shift = (torch.rand(size, 2, generator=generator) * 2 - 1) * margin[:, None]
    theta = torch.zeros(size, 2, 3)
    theta[:, 0, 0] = 1 / zoom
    theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    spread = settings.jitter
    brightness = (torch.rand(size, 1, 1, 1, generator=generator) * 2 - 1) * spread
    contrast = 1 + (torch.rand(size, 1, 1, 1, generator=generator) * 2 - 1) * spread
    mean = moved.mean(dim=(1, 2, 3), keepdim=True)
    jittered = (moved - mean) * contrast.to(images) + mean + brightness.to(images)
    return jittered.clamp(0, 1)
