"""A fixed set of augmented views of the tuning images, for stage 2's cached features.

Sixteen shots per class are few: prompts tuned on exactly those images learn to keep *their*
clean decisions and to undo the trigger on *them*, and both hold less well on images never
seen. Each view is a seeded random zoom, shift and horizontal flip of every image, drawn once,
so that the image features can still be computed once and each tuning step runs only the text
tower. A trigger is stamped after the view is taken: the attacker stamps a fixed trigger on
whatever image comes, so the content varies under it, not the trigger.

View 0 is always the images themselves. Zooms only enlarge (up to ``max_zoom``) and shifts stay
within the enlarged margin, so no view samples outside the image and none needs padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

View = Callable[[torch.Tensor], torch.Tensor]


def fixed_views(count: int, size: int, *, seed: int, max_zoom: float = 1.2) -> list[View]:
    """``count`` views of a batch of ``size`` images ``(size, 3, H, W)``; the first is the
    identity. The same ``seed`` gives the same views."""
    if count < 1:
        raise ValueError("at least one view (the images themselves) is needed")
    generator = torch.Generator().manual_seed(seed)
    views: list[View] = [_identity]
    for _ in range(count - 1):
        zoom = 1 + torch.rand(size, generator=generator) * (max_zoom - 1)
        # Within the zoomed image's margin: the sampled window stays inside [-1, 1].
        margin = 1 - 1 / zoom
        shift = (torch.rand(size, 2, generator=generator) * 2 - 1) * margin[:, None]
        flip = torch.where(torch.rand(size, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(size, 2, 3)
        theta[:, 0, 0] = flip / zoom
        theta[:, 1, 1] = 1 / zoom
        theta[:, :, 2] = shift
        views.append(_affine(theta))
    return views


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


def _affine(theta: torch.Tensor) -> View:
    def view(images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] != theta.shape[0]:
            raise ValueError(f"view drawn for {theta.shape[0]} images, got {images.shape[0]}")
        grid = F.affine_grid(
            theta.to(images.device, images.dtype), list(images.shape), align_corners=False
        )
        # The window lies within the image; "border" serves the half pixel at its very edge.
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode="border", align_corners=False
        )

    return view
