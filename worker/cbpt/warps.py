"""Warp-shaped triggers for re-inversion: the shape of WaNet-like backdoors.

A warp moves every pixel a little along a smooth field and overwrites none, so a mask, per pixel
or one blend weight, imitates it poorly. Here the field is ``(2, k, k)`` offsets (x then y) at
``k`` x ``k`` control points, upsampled bicubically to the image, in shares of the image side.
Each offset is held to ``budget`` by ``budget * tanh(raw)``, so the bound is exact and a warm
start from the last warp is ``atanh`` of its offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from worker.cbpt.inversion import Trigger


def warp(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``images`` ``(N, 3, H, W)`` resampled along ``offsets`` ``(2, k, k)`` (shares of the
    side), differentiable in both; the border repeats where the field points outside."""
    height, width = images.shape[-2:]
    field = F.interpolate(
        offsets[None].to(images.device, images.dtype),
        size=(height, width),
        mode="bicubic",
        align_corners=True,
    )
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, height, device=images.device, dtype=images.dtype),
        torch.linspace(-1, 1, width, device=images.device, dtype=images.dtype),
        indexing="ij",
    )
    identity = torch.stack((xs, ys), dim=-1)[None]
    # A share of the side is twice that in grid units, which span [-1, 1].
    grid = (identity + 2 * field.permute(0, 2, 3, 1)).clamp(-1, 1)
    return F.grid_sample(
        images,
        grid.expand(images.shape[0], -1, -1, -1),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )


@dataclass(frozen=True)
class WarpTrigger:
    """A re-inverted warp: offsets ``(2, k, k)`` in shares of the image side."""

    offsets: torch.Tensor

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return warp(images, self.offsets)

    @property
    def mask_fraction(self) -> float:
        """A warp overwrites no pixel: 0, so that every trigger reports one figure."""
        return 0.0

    @property
    def displacement(self) -> float:
        """Mean absolute offset at the control points, as a share of the image side."""
        return float(self.offsets.abs().mean())


AnyTrigger = Trigger | WarpTrigger
"""What stage 2 may tune against: stage 1's mask-and-pattern, or a re-inverted warp."""


class WarpParameters:
    """The raw offsets of a warp being fitted, with their optimiser; the counterpart of
    ``TriggerParameters`` for the warp shape."""

    def __init__(self, raw: torch.Tensor, budget: float, lr: float) -> None:
        self.raw = raw.detach().clone().requires_grad_(True)
        self.budget = budget
        self.optimizer = torch.optim.Adam([self.raw], lr=lr, betas=(0.5, 0.9))

    @classmethod
    def random(
        cls, grid: int, budget: float, generator: torch.Generator, device: torch.device, lr: float
    ) -> WarpParameters:
        # Offsets of about a third of the budget: a start that already moves pixels both ways.
        raw = torch.randn(2, grid, grid, generator=generator) * 0.35
        return cls(raw.to(device), budget, lr)

    @classmethod
    def starting_from(
        cls, trigger: WarpTrigger, budget: float, device: torch.device, lr: float
    ) -> WarpParameters:
        share = (trigger.offsets / budget).clamp(-0.999, 0.999)
        return cls(torch.atanh(share).to(device), budget, lr)

    def offsets(self) -> torch.Tensor:
        return self.budget * torch.tanh(self.raw)

    def stamp(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Warped images and the offsets' magnitudes, whose mean is the warp's size."""
        offsets = self.offsets()
        return warp(images, offsets), offsets.abs()

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()

    def trigger(self) -> WarpTrigger:
        return WarpTrigger(self.offsets().detach().cpu())
