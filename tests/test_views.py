"""The fixed augmented views stage 2 caches features of."""

from __future__ import annotations

import pytest
import torch

from worker.cbpt.views import fixed_views


def _images(count: int = 6, side: int = 16) -> torch.Tensor:
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(3))


def test_the_first_view_is_the_images_themselves() -> None:
    images = _images()
    (only,) = fixed_views(1, images.shape[0], seed=0)
    assert only(images) is images


def test_views_are_seeded() -> None:
    images = _images()
    first = [view(images) for view in fixed_views(3, images.shape[0], seed=5)]
    again = [view(images) for view in fixed_views(3, images.shape[0], seed=5)]
    other = [view(images) for view in fixed_views(3, images.shape[0], seed=6)]
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[1], other[1])
    assert not torch.equal(first[1], first[2])  # each view is drawn on its own


def test_views_keep_shape_and_never_sample_outside_the_image() -> None:
    # A constant image stays constant only if no view reads padding beyond its border.
    images = torch.full((8, 3, 20, 20), 0.7)
    for view in fixed_views(5, 8, seed=1, max_zoom=1.5):
        viewed = view(images)
        assert viewed.shape == images.shape
        torch.testing.assert_close(viewed, images)


def test_without_zoom_a_view_is_the_image_or_its_mirror() -> None:
    images = _images(count=32)
    (_, view) = fixed_views(2, 32, seed=0, max_zoom=1.0)
    viewed = view(images)
    same = [torch.allclose(v, x, atol=1e-5) for v, x in zip(viewed, images, strict=True)]
    mirrored = [
        torch.allclose(v, x.flip(-1), atol=1e-5) for v, x in zip(viewed, images, strict=True)
    ]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert any(same)
    assert any(mirrored)


def test_a_view_refuses_another_batch_and_a_count_below_one() -> None:
    (_, view) = fixed_views(2, 4, seed=0)
    with pytest.raises(ValueError, match="drawn for 4 images"):
        view(_images(count=5))
    with pytest.raises(ValueError, match="at least one view"):
        fixed_views(0, 4, seed=0)
