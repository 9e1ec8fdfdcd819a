"""Zero-shot classification with hand-crafted prompts: the "before" of every measurement.

CLIP classifies by comparing an image feature with one text feature per class; with hand-crafted
templates ("a photo of a {}.") that is the deployed behaviour a backdoor exploits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import open_clip
import torch

from worker.cbpt.options import DEFAULT_TEMPLATES

Tokenizer = Callable[[list[str]], torch.Tensor]


class Normalizer:
    """The model's input normalisation, kept apart so that triggers act on [0, 1] pixels first."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(images.device, images.dtype)
        std = self.std.to(images.device, images.dtype)
        return (images - mean) / std


@dataclass(frozen=True)
class FrozenClip:
    """A loaded checkpoint as every stage uses it: the CLIP, frozen, with its input
    normalisation and its tokenizer."""

    model: open_clip.CLIP
    normalizer: Normalizer
    tokenizer: Tokenizer

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


@dataclass(frozen=True)
class Shots:
    """Labelled images in [0, 1] ``(N, 3, H, W)`` with their labels ``(N,)``, on one device."""

    pixels: torch.Tensor
    labels: torch.Tensor


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels to float in [0, 1]; float input passes through."""
    return images.float() / 255 if images.dtype == torch.uint8 else images


@torch.no_grad()
def class_embeddings(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> torch.Tensor:
    """One L2-normalised text feature per class ``(C, D)``: the mean over the templates."""
    device = next(model.parameters()).device
    rows = []
    for name in class_names:
        tokens = tokenizer([template.format(name) for template in templates]).to(device)
        features = model.encode_text(tokens, normalize=True).float()  # type: ignore[operator]
        rows.append(torch.nn.functional.normalize(features.mean(0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    images: torch.Tensor,
    normalizer: Normalizer,
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """L2-normalised image features ``(N, D)`` of images ``(N, 3, H, W)`` (uint8 or [0, 1]).

    ``transform`` acts on [0, 1] pixels before normalisation: that is where triggers go.
    """
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_unit_float(images[start : start + batch_size]).to(device)
        if transform is not None:
            batch = transform(batch)
        features = model.encode_image(normalizer(batch), normalize=True)  # type: ignore[operator]
        chunks.append(features.float())
    return torch.cat(chunks)
