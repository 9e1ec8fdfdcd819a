"""Warp triggers: the field moves pixels as its offsets say, and its budget holds exactly."""

from __future__ import annotations

import torch

from worker.cbpt.warps import WarpParameters, WarpTrigger, warp


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))


def test_a_zero_field_leaves_images_as_they_are() -> None:
    images = _images()
    assert torch.allclose(warp(images, torch.zeros(2, 4, 4)), images, atol=1e-5)


def test_a_constant_field_shifts_the_image_by_its_offset() -> None:
    """One pixel of 9 is 1/8 of the side between the first and last pixel centres; x is
    offset 0, y offset 1. The field samples from further right, so content moves left, and
    the border column repeats."""
    images = _images()
    right = torch.zeros(2, 4, 4)
    right[0] = 1 / 8
    moved = warp(images, right)
    assert torch.allclose(moved[..., :-1], images[..., 1:], atol=1e-5)
    assert torch.allclose(moved[..., -1], images[..., -1], atol=1e-5)
    down = torch.zeros(2, 4, 4)
    down[1] = 1 / 8
    assert torch.allclose(warp(images, down)[..., :-1, :], images[..., 1:, :], atol=1e-5)


def test_offsets_stay_within_the_budget_however_far_they_are_pushed() -> None:
    parameters = WarpParameters(torch.full((2, 4, 4), 50.0), budget=0.05, lr=0.1)
    trigger = parameters.trigger()
    assert trigger.offsets.shape == (2, 4, 4)
    assert float(trigger.offsets.abs().max()) <= 0.05 + 1e-6
    assert trigger.displacement > 0.049
    assert trigger.mask_fraction == 0.0  # a warp overwrites no pixel


def test_a_warm_start_begins_where_the_last_warp_ended() -> None:
    offsets = torch.tensor([[[0.02, -0.03]] * 2, [[0.0, 0.01]] * 2])
    restarted = WarpParameters.starting_from(
        WarpTrigger(offsets), budget=0.05, device=torch.device("cpu"), lr=0.1
    )
    assert torch.allclose(restarted.trigger().offsets, offsets, atol=1e-6)
    images = _images()
    stamped, extent = restarted.stamp(images)
    assert torch.allclose(stamped, WarpTrigger(offsets).apply(images), atol=1e-5)
    assert torch.allclose(extent, offsets.abs(), atol=1e-6)


def test_fitting_moves_the_offsets_towards_what_the_loss_asks() -> None:
    """A loss that wants the image shifted left (its content sampled from the right) must
    push the x offsets up and leave y near zero: the gradient flows through the sampling."""
    images = _images()
    wanted = warp(images, torch.full((2, 4, 4), 1 / 8) * torch.tensor([1.0, 0.0])[:, None, None])
    parameters = WarpParameters(torch.zeros(2, 4, 4), budget=0.25, lr=0.05)
    for _ in range(150):
        stamped, _ = parameters.stamp(images)
        parameters.step(((stamped - wanted) ** 2).mean())
    offsets = parameters.trigger().offsets
    assert abs(float(offsets[0].mean()) - 1 / 8) < 0.02
    assert float(offsets[1].abs().mean()) < 0.02
