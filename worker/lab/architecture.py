"""The lab's own open_clip architecture: a CLIP small enough to train on two CPU cores.

It is a plain open_clip ``CLIP`` (ViT image tower, transformer text tower, the standard BPE
tokenizer), so everything built for real checkpoints runs on it unchanged; only the sizes shrink.
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
from pydantic import BaseModel, ConfigDict, Field

VOCAB_SIZE = 49408  # open_clip's BPE tokenizer: token ids must fit the embedding table


class TinyClipConfig(BaseModel):
    """Sizes of a lab CLIP. Defaults: 32 px images in 4 x 4 patches, 128-wide towers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(default=32, ge=8, le=224)
    patch_size: int = Field(default=8, ge=2, le=32)
    vision_width: int = Field(default=128, ge=16, le=768)
    vision_layers: int = Field(default=4, ge=1, le=12)
    text_width: int = Field(default=128, ge=16, le=768)
    text_layers: int = Field(default=3, ge=1, le=12)
    head_width: int = Field(default=32, ge=8, le=128)
    embed_dim: int = Field(default=64, ge=16, le=1024)
    # Room for a 16-token learnable context plus the longest class name.
    context_length: int = Field(default=32, ge=8, le=77)

    def model_cfg(self) -> dict[str, Any]:
        """The ``model_cfg`` block of an open_clip config."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.head_width,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": VOCAB_SIZE,
                "width": self.text_width,
                "heads": max(1, self.text_width // self.head_width),
                "layers": self.text_layers,
            },
        }


def build_model(config: TinyClipConfig, *, seed: int) -> open_clip.CLIP:
    """A freshly initialised lab CLIP; the same seed gives the same initial weights."""
    torch.manual_seed(seed)
    return open_clip.CLIP(**config.model_cfg())
