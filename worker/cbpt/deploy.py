"""Deploying a purified model: the unchanged checkpoint plus purified prompts or their head.

Deployment needs only the image encoder and the class-embedding matrix; ``prompts.safetensors``
rebuilds that matrix through the text tower, ``head.safetensors`` carries it ready-made. Either
file names the checkpoint it belongs to (``model_sha256``), and a mismatch is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.cbpt.artifacts import read_classes
from worker.cbpt.checkpoint import load_checkpoint
from worker.cbpt.prompts import ClassPrompts, prompt_class_embeddings
from worker.cbpt.zeroshot import Normalizer


class PurifiedClassifier(nn.Module):
    """Maps images ``(B, 3, S, S)`` in [0, 1] to logits ``(B, C)`` over ``classes``."""

    def __init__(
        self,
        model: nn.Module,
        class_embeddings: torch.Tensor,
        logit_scale: float,
        normalizer: Normalizer,
        classes: list[str],
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("class_embeddings", class_embeddings.detach().clone())
        self.logit_scale = logit_scale
        self.normalizer = normalizer
        self.classes = classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(self.normalizer(images), normalize=True)  # type: ignore[operator]
        embeddings: torch.Tensor = self.class_embeddings  # type: ignore[assignment]
        return self.logit_scale * features @ embeddings.T  # type: ignore[no-any-return]


def load_purified_classifier(
    checkpoint: Path,
    prompts_or_head: Path,
    *,
    architecture: str | Path | dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> PurifiedClassifier:
    """Builds a ready classifier from a checkpoint and a ``prompts`` or ``head`` file."""
    loaded = load_checkpoint(checkpoint, architecture, device=device)
    tensors, classes, metadata = read_classes(prompts_or_head)
    if metadata.get("model_sha256") != loaded.sha256:
        raise ValueError(
            f"{prompts_or_head.name} belongs to model {metadata.get('model_sha256', '?')[:12]}, "
            f"not to this checkpoint ({loaded.sha256[:12]})"
        )
    if "class_embeddings" in tensors:
        embeddings = tensors["class_embeddings"].to(device)
        scale = float(tensors["logit_scale"])
    elif "context" in tensors:
        context = tensors["context"]
        prompts = ClassPrompts(
            loaded.model, loaded.tokenizer, classes, n_ctx=int(context.shape[1]), init=None
        ).to(device)
        with torch.no_grad():
            prompts.context.copy_(context)
        embeddings = prompt_class_embeddings(loaded.model, prompts)
        scale = float(loaded.model.logit_scale.exp())
    else:
        raise ValueError(f"{prompts_or_head.name} holds neither 'class_embeddings' nor 'context'")
    if embeddings.shape[0] != len(classes):
        raise ValueError(
            f"{prompts_or_head.name}: {embeddings.shape[0]} rows for {len(classes)} classes"
        )
    normalizer = Normalizer(loaded.preprocess.mean, loaded.preprocess.std)
    return PurifiedClassifier(loaded.model, embeddings, scale, normalizer, classes).eval()
