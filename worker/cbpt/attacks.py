"""The attack library: known backdoor triggers as JSON-serialisable specs with a pure ``apply``.

A spec names one trigger from the literature with every parameter that shapes it, so that a job can
name a trigger the client knows of and the report can measure the attack success rate against it.
``apply`` works on float images ``(B, 3, H, W)`` in [0, 1] of any size, before the model's
normalisation (as the CLIP poisoning code of CleanCLIP and BadCLIP does), keeps shape and range,
and is deterministic: the same spec gives the same output for the same input, always.

Sizes are fractions of the image side, and fixed patterns are drawn on a coarse grid and resized,
so one spec describes the same trigger at 32 px and at 224 px.

The training-time recipe (which images get poisoned, and how) belongs to the lab; a spec only
records the ``poisoning`` mode it was implanted with and the ``target`` class, which ASR needs.

The specs are part of the engine's torch-free contract: the API validates them without loading
torch. What touches tensors lives in ``attack_ops``, which the methods that need it import when
they are called.

Example::

    >>> import torch
    >>> spec = BadNets(seed=1, size=0.1, position="bottom-right")
    >>> triggered = spec.apply(torch.rand(4, 3, 32, 32))
    >>> triggered.shape
    torch.Size([4, 3, 32, 32])
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

if TYPE_CHECKING:
    import torch

# A pattern image carried inside a spec stays small: it is a trigger, not a picture.
MAX_PATTERN_SIDE = 256
Position = Literal["random", "center", "top-left", "top-right", "bottom-left", "bottom-right"]


def pattern_pixels(text: str) -> np.ndarray:
    """Decodes base64 PNG text into ``(h, w, 3)`` uint8 pixels, or raises ``ValueError``.

    The side cap is checked from the header before any pixel is decoded.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError("pattern is not valid base64") from exc
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format != "PNG":
                raise ValueError(f"pattern must be a PNG image, got {image.format}")
            if max(image.size) > MAX_PATTERN_SIDE:
                raise ValueError(
                    f"pattern is {image.size}, larger than {MAX_PATTERN_SIDE} px a side"
                )
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"pattern is not a readable PNG: {exc}") from exc
    return array


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str | None = Field(
        default=None, description="Class the trigger sends images to (a class name of the task)."
    )
    seed: int = Field(default=0, ge=0, lt=2**63, description="Seeds every random part of it.")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Returns triggered copies of ``images`` ``(B, 3, H, W)`` in [0, 1]."""
        from worker.cbpt import attack_ops

        return attack_ops.apply(self, images)


class _PatchSpec(_Spec):
    size: float = Field(
        default=0.1, gt=0, le=1, description="Patch side, fraction of the image side."
    )
    position: Position = "bottom-right"
    cells: int = Field(default=3, ge=1, le=64, description="Seeded pattern grid, cells a side.")
    pattern_png: str | None = Field(
        default=None, description="Explicit pattern as base64 PNG; overrides the seeded one."
    )

    @field_validator("pattern_png")
    @classmethod
    def _pattern_decodes(cls, value: str | None) -> str | None:
        if value is not None:
            pattern_pixels(value)
        return value

    def pattern(self) -> torch.Tensor:
        """The patch pattern ``(3, h, w)`` at its native resolution."""
        from worker.cbpt import attack_ops

        return attack_ops.patch_pattern(self)

    def patch_side(self, height: int, width: int) -> int:
        return max(1, round(self.size * min(height, width)))

    def paste(self, images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        """Pastes ``pattern`` ``(3, h, w)`` where this spec puts its patch; differentiable in it."""
        from worker.cbpt import attack_ops

        return attack_ops.paste(self, images, pattern)


class BadNets(_PatchSpec):
    """BadNets (Gu et al., 2017): a small patch pasted on the image, dirty-label poisoning.

    Literature: a 3x3 pattern at the bottom-right corner for CIFAR-sized images (BackdoorBench), a
    16x16 noise patch at a random place on 224 px images for CLIP (CleanCLIP, BadCLIP: 7% of the
    side). ``size`` is the side as a fraction of the image side; the pattern is a seeded
    ``cells`` x ``cells`` grid of random colours, resized with nearest-neighbour sampling.
    """

    name: Literal["badnets"] = "badnets"
    poisoning: Literal["dirty-label"] = "dirty-label"


class LabelConsistent(_PatchSpec):
    """Label-consistent BadNets (Turner et al., 2019): the BadNets patch, clean-label poisoning.

    Only images that truly belong to the target class are poisoned, and their captions are kept;
    Turner et al. first perturb those images adversarially so that the model must lean on the
    patch to recognise them (the lab does so with PGD against the clean model, L-inf budget
    ``adversarial_eps``). The trigger itself is applied exactly as BadNets'.
    """

    name: Literal["label-consistent"] = "label-consistent"
    poisoning: Literal["clean-label"] = "clean-label"
    adversarial_eps: float = Field(default=16 / 255, ge=0, le=1)


class Blended(_Spec):
    """Blended (Chen et al., 2017): ``(1 - alpha) * x + alpha * pattern`` over the whole image.

    Literature: alpha 0.2 with uniform noise (CleanCLIP, BadCLIP) or the Hello Kitty image
    (BackdoorBench). The noise is drawn on a ``resolution`` x ``resolution`` grid from the seed and
    resized bilinearly to the image; ``image_png`` blends a given picture instead.
    """

    name: Literal["blended"] = "blended"
    poisoning: Literal["dirty-label"] = "dirty-label"
    alpha: float = Field(default=0.2, gt=0, le=1)
    resolution: int = Field(default=32, ge=1, le=MAX_PATTERN_SIDE)
    image_png: str | None = None

    @field_validator("image_png")
    @classmethod
    def _image_decodes(cls, value: str | None) -> str | None:
        if value is not None:
            pattern_pixels(value)
        return value

    def pattern(self) -> torch.Tensor:
        """The blended pattern ``(3, h, w)`` at its native resolution."""
        from worker.cbpt import attack_ops

        return attack_ops.blend_pattern(self)


class SIG(_Spec):
    """SIG (Barni et al., 2019): a horizontal sinusoid added to every row and channel.

    ``delta * sin(2 * pi * j * frequency / W)`` for column j. Literature: delta 20/255 (original),
    40/255 (BackdoorBench), 60/255 (BadCLIP); frequency 6 periods across the width. The signal is
    defined in periods per image width, so it scales with the image.
    """

    name: Literal["sig"] = "sig"
    poisoning: Literal["dirty-label"] = "dirty-label"
    delta: float = Field(default=40 / 255, gt=0, le=1)
    frequency: float = Field(default=6, gt=0, le=1024)


class WaNet(_Spec):
    """WaNet (Nguyen and Tran, 2021): an imperceptible, smooth warp of the whole image.

    A ``k`` x ``k`` field of uniform [-1, 1] offsets, normalised by its mean absolute value,
    upsampled bicubically to the image and added to the identity sampling grid with strength
    ``s``. Literature: k 4, s 0.5 on 32 px CIFAR-10 (WaNet, BackdoorBench); CLIP poisoning code
    uses a per-pixel field (k 224, s 1). WaNet's offset is ``s / H`` in grid units; here H is a
    32-pixel reference, so the warp moves content by the same share of the image at every size
    and ``s`` keeps the meaning it has on CIFAR-10.
    """

    name: Literal["wanet"] = "wanet"
    poisoning: Literal["dirty-label"] = "dirty-label"
    k: int = Field(default=4, ge=2, le=MAX_PATTERN_SIDE)
    s: float = Field(default=0.5, gt=0, le=32)
    grid_rescale: float = Field(default=1.0, gt=0, le=2)

    REFERENCE_SIDE: ClassVar[int] = 32

    def warp_grid(self, height: int, width: int) -> torch.Tensor:
        """The sampling grid ``(1, H, W, 2)`` for ``F.grid_sample``."""
        from worker.cbpt import attack_ops

        return attack_ops.warp_grid(self, height, width)


class OptimizedPatch(_PatchSpec):
    """An optimised patch (TrojVQA, Walmer et al. 2022; BadCLIP, Liang et al. 2024).

    The pattern is optimised against the clean model so that patched images embed close to the
    target class's text feature, then used to poison; the spec carries the optimised pixels in
    ``pattern_png``. Literature: a patch of 20% of the side at the centre (TrojVQA) or 16 px at the
    centre of 224 px images (BadCLIP).
    """

    name: Literal["optimized-patch"] = "optimized-patch"
    poisoning: Literal["dirty-label"] = "dirty-label"
    size: float = Field(default=0.2, gt=0, le=1)
    position: Position = "center"
    pattern_png: str


AttackSpec = Annotated[
    BadNets | LabelConsistent | Blended | SIG | WaNet | OptimizedPatch,
    Field(discriminator="name"),
]
ATTACK_NAMES: tuple[str, ...] = (
    "badnets",
    "blended",
    "sig",
    "wanet",
    "label-consistent",
    "optimized-patch",
)
_ADAPTER: TypeAdapter[AttackSpec] = TypeAdapter(AttackSpec)


def parse_attack(data: str | bytes | dict[str, object]) -> AttackSpec:
    """Parses an attack spec from JSON text or a mapping; raises ``pydantic.ValidationError``."""
    if isinstance(data, dict):
        return _ADAPTER.validate_python(data)
    return _ADAPTER.validate_json(data)
