"""What the attack specs do to tensors: stamping, blending, adding and warping.

``attacks.py`` holds the specs (torch-free, so that the API can validate them); their methods
call these functions. Each is deterministic: the same spec gives the same output for the same
input, and every random part comes from the spec's seed, one stream per part.
"""

from __future__ import annotations

import base64
import io
import math

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from PIL import Image

from worker.cbpt.attacks import (
    SIG,
    AttackSpec,
    Blended,
    WaNet,
    _PatchSpec,
    _Spec,
    pattern_pixels,
)


def apply(spec: _Spec, images: torch.Tensor) -> torch.Tensor:
    """Triggered copies of ``images`` ``(B, 3, H, W)`` in [0, 1], same shape, dtype and range."""
    _check_images(images)
    floats = images.float()
    if isinstance(spec, _PatchSpec):
        out = paste(spec, floats, patch_pattern(spec))
    elif isinstance(spec, Blended):
        pattern = F.interpolate(
            blend_pattern(spec)[None].to(floats.device),
            size=floats.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        out = (1 - spec.alpha) * floats + spec.alpha * pattern
    elif isinstance(spec, SIG):
        width = floats.shape[-1]
        columns = torch.arange(width, dtype=torch.float32, device=floats.device)
        signal = spec.delta * torch.sin(2 * math.pi * columns * spec.frequency / width)
        out = floats + signal.view(1, 1, 1, width)
    elif isinstance(spec, WaNet):
        grid = warp_grid(spec, *floats.shape[-2:]).to(floats.device)
        grid = grid.expand(floats.shape[0], -1, -1, -1)
        out = F.grid_sample(
            floats, grid, mode="bilinear", padding_mode="border", align_corners=True
        )
    else:
        raise TypeError(f"no operation for {type(spec).__name__}")
    return out.clamp(0, 1).to(images.dtype)


def patch_pattern(spec: _PatchSpec) -> torch.Tensor:
    """The patch pattern ``(3, h, w)`` at its native resolution: the spec's PNG, or a seeded
    ``cells`` x ``cells`` grid of random colours."""
    if spec.pattern_png is not None:
        return decode_pattern_png(spec.pattern_png)
    return torch.rand(3, spec.cells, spec.cells, generator=_generator(spec, 0))


def blend_pattern(spec: Blended) -> torch.Tensor:
    """The blended pattern ``(3, h, w)``: the spec's picture, or seeded uniform noise."""
    if spec.image_png is not None:
        return decode_pattern_png(spec.image_png)
    return torch.rand(3, spec.resolution, spec.resolution, generator=_generator(spec, 0))


def paste(spec: _PatchSpec, images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Pastes ``pattern`` ``(3, h, w)`` where ``spec`` puts its patch; differentiable in it."""
    batch, _, height, width = images.shape
    side = spec.patch_side(height, width)
    pattern = pattern.to(images.device, images.dtype)
    patch = F.interpolate(pattern[None], size=(side, side), mode="nearest")[0]
    rows, cols = _corners(spec, batch, height, width, side)
    out = images.clone()
    for index, (row, col) in enumerate(zip(rows, cols, strict=True)):
        out[index, :, row : row + side, col : col + side] = patch
    return out


def warp_grid(spec: WaNet, height: int, width: int) -> torch.Tensor:
    """The sampling grid ``(1, H, W, 2)`` for ``F.grid_sample``."""
    noise = torch.rand(1, 2, spec.k, spec.k, generator=_generator(spec, 0)) * 2 - 1
    noise = noise / noise.abs().mean()
    noise = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True)
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij"
    )
    identity = torch.stack((xs, ys), dim=-1)[None]
    grid = identity + spec.s * noise.permute(0, 2, 3, 1) / spec.REFERENCE_SIDE
    return (grid * spec.grid_rescale).clamp(-1, 1)


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
    """Decodes base64 PNG text into a ``(3, h, w)`` float pattern in [0, 1]."""
    return torch.from_numpy(pattern_pixels(text).copy()).permute(2, 0, 1).float() / 255


def _corners(
    spec: _PatchSpec, batch: int, height: int, width: int, side: int
) -> tuple[list[int], list[int]]:
    if spec.position == "random":
        generator = _generator(spec, 1)
        rows = torch.randint(0, height - side + 1, (batch,), generator=generator)
        cols = torch.randint(0, width - side + 1, (batch,), generator=generator)
        return rows.tolist(), cols.tolist()
    row = {"top": 0, "center": (height - side) // 2, "bottom": height - side}
    col = {"left": 0, "center": (width - side) // 2, "right": width - side}
    vertical, _, horizontal = spec.position.partition("-")
    return [row[vertical]] * batch, [col[horizontal or "center"]] * batch


def _generator(spec: AttackSpec | _Spec, stream: int) -> torch.Generator:
    """One independent stream per random part, so adding a part never shifts another."""
    return torch.Generator().manual_seed((spec.seed * 1_000_003 + stream) % 2**63)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
