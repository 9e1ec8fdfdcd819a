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
import math
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

# A pattern image carried inside a spec stays small: it is a trigger, not a picture.
MAX_PATTERN_SIDE = 256
Position = Literal["random", "center", "top-left", "top-right", "bottom-left", "bottom-right"]


def encode_pattern_png(pattern: torch.Tensor) -> str:
    """Encodes a ``(3, h, w)`` pattern in [0, 1] as base64 PNG text (8 bits per channel).

    Patterns travel inside JSON specs; PNG keeps them lossless at the precision a trigger
    stamped on an 8-bit image can have anyway.
    """
    if pattern.ndim != 3 or pattern.shape[0] != 3:
        raise ValueError(f"pattern must be (3, h, w), got {tuple(pattern.shape)}")
    pixels = (pattern.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy(), mode="RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_pattern_png(text: str) -> torch.Tensor:
    """Decodes base64 PNG text into a ``(3, h, w)`` float pattern in [0, 1].

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
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str | None = Field(
        default=None, description="Class the trigger sends images to (a class name of the task)."
    )
    seed: int = Field(default=0, ge=0, lt=2**63, description="Seeds every random part of it.")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Returns triggered copies of ``images`` ``(B, 3, H, W)`` in [0, 1]."""
        _check_images(images)
        out = self._apply(images.float())
        return out.clamp(0, 1).to(images.dtype)

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _generator(self, stream: int) -> torch.Generator:
        # One independent stream per random part, so adding a part never shifts another.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + stream) % 2**63)


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
            decode_pattern_png(value)
        return value

    def pattern(self) -> torch.Tensor:
        """The patch pattern ``(3, h, w)`` at its native resolution."""
        if self.pattern_png is not None:
            return decode_pattern_png(self.pattern_png)
        return torch.rand(3, self.cells, self.cells, generator=self._generator(0))

    def patch_side(self, height: int, width: int) -> int:
        return max(1, round(self.size * min(height, width)))

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        return self.paste(images, self.pattern())

    def paste(self, images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        """Pastes ``pattern`` ``(3, h, w)`` where this spec puts its patch; differentiable in it."""
        batch, _, height, width = images.shape
        side = self.patch_side(height, width)
        pattern = pattern.to(images.device, images.dtype)
        patch = F.interpolate(pattern[None], size=(side, side), mode="nearest")[0]
        rows, cols = self._corners(batch, height, width, side)
        out = images.clone()
        for index, (row, col) in enumerate(zip(rows, cols, strict=True)):
            out[index, :, row : row + side, col : col + side] = patch
        return out

    def _corners(
        self, batch: int, height: int, width: int, side: int
    ) -> tuple[list[int], list[int]]:
        if self.position == "random":
            generator = self._generator(1)
            rows = torch.randint(0, height - side + 1, (batch,), generator=generator)
            cols = torch.randint(0, width - side + 1, (batch,), generator=generator)
            return rows.tolist(), cols.tolist()
        row = {"top": 0, "center": (height - side) // 2, "bottom": height - side}
        col = {"left": 0, "center": (width - side) // 2, "right": width - side}
        vertical, _, horizontal = self.position.partition("-")
        return [row[vertical]] * batch, [col[horizontal or "center"]] * batch


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
            decode_pattern_png(value)
        return value

    def pattern(self) -> torch.Tensor:
        if self.image_png is not None:
            return decode_pattern_png(self.image_png)
        return torch.rand(3, self.resolution, self.resolution, generator=self._generator(0))

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        pattern = F.interpolate(
            self.pattern()[None].to(images.device), size=size, mode="bilinear", align_corners=False
        )
        return (1 - self.alpha) * images + self.alpha * pattern


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

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        width = images.shape[-1]
        columns = torch.arange(width, dtype=torch.float32, device=images.device)
        signal = self.delta * torch.sin(2 * math.pi * columns * self.frequency / width)
        return images + signal.view(1, 1, 1, width)


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
        noise = torch.rand(1, 2, self.k, self.k, generator=self._generator(0)) * 2 - 1
        noise = noise / noise.abs().mean()
        noise = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True)
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij"
        )
        identity = torch.stack((xs, ys), dim=-1)[None]
        grid = identity + self.s * noise.permute(0, 2, 3, 1) / self.REFERENCE_SIDE
        return (grid * self.grid_rescale).clamp(-1, 1)

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.warp_grid(*images.shape[-2:]).to(images.device)
        grid = grid.expand(images.shape[0], -1, -1, -1)
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode="border", align_corners=True
        )


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


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
