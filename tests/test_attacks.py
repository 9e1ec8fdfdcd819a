"""The attack library: every trigger is deterministic, keeps shape and range, and changes images."""

from __future__ import annotations

import json

import pydantic
import pytest
import torch

from worker.cbpt.attack_ops import decode_pattern_png, encode_pattern_png
from worker.cbpt.attacks import (
    ATTACK_NAMES,
    SIG,
    AttackSpec,
    BadNets,
    Blended,
    LabelConsistent,
    OptimizedPatch,
    WaNet,
    parse_attack,
)


def _pattern(seed: int = 3, side: int = 5) -> str:
    return encode_pattern_png(
        torch.rand(3, side, side, generator=torch.Generator().manual_seed(seed))
    )


ALL_SPECS: list[AttackSpec] = [
    BadNets(seed=1),
    BadNets(seed=1, position="random", size=0.2),
    LabelConsistent(seed=2, position="top-left"),
    Blended(seed=3),
    SIG(),
    WaNet(seed=4),
    OptimizedPatch(pattern_png=_pattern()),
]


def test_every_attack_name_has_a_spec() -> None:
    assert {spec.name for spec in ALL_SPECS} == set(ATTACK_NAMES)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.name}")
@pytest.mark.parametrize("size", [16, 32, 57, 224])
def test_keeps_shape_range_and_changes_the_image(spec: AttackSpec, size: int) -> None:
    images = torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(size)) * 0.8 + 0.1
    out = spec.apply(images)
    assert out.shape == images.shape
    assert out.dtype == images.dtype
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0
    changed = (out - images).abs().flatten(1).amax(1)
    assert bool((changed > 1e-3).all()), "every image must carry the trigger"
    assert not torch.equal(images, out)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.name}")
def test_deterministic_for_a_seed(spec: AttackSpec) -> None:
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(spec.apply(images), spec.apply(images.clone()))
    rebuilt = parse_attack(spec.model_dump_json())
    assert rebuilt == spec
    assert torch.equal(rebuilt.apply(images), spec.apply(images))


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (BadNets(seed=1), BadNets(seed=2)),
        (Blended(seed=1), Blended(seed=2)),
        (WaNet(seed=1), WaNet(seed=2)),
        (BadNets(seed=1, position="random"), BadNets(seed=2, position="random")),
    ],
)
def test_seed_changes_the_trigger(one: AttackSpec, other: AttackSpec) -> None:
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(one.apply(images), other.apply(images))


def test_patch_scales_with_the_image_and_sits_where_asked() -> None:
    spec = BadNets(seed=0, size=0.125, position="bottom-right")
    for size in (32, 224):
        images = torch.zeros(1, 3, size, size)
        out = spec.apply(images)
        side = round(0.125 * size)
        changed = (out != images).any(1)[0]
        rows, cols = torch.nonzero(changed, as_tuple=True)
        assert int(rows.min()) >= size - side
        assert int(cols.min()) >= size - side
        assert int(rows.max()) == size - 1
        assert int(cols.max()) == size - 1


def test_blend_follows_its_formula() -> None:
    spec = Blended(seed=5, alpha=0.2, resolution=32)
    images = torch.rand(2, 3, 32, 32)
    expected = 0.8 * images + 0.2 * spec.pattern()[None]
    torch.testing.assert_close(spec.apply(images), expected)


def test_sig_is_a_horizontal_sinusoid() -> None:
    spec = SIG(delta=0.1, frequency=4)
    images = torch.full((1, 3, 8, 64), 0.5)
    delta = spec.apply(images) - images
    assert torch.allclose(delta[0, 0, 0], delta[0, 2, 7])  # same in every row and channel
    assert float(delta.max()) == pytest.approx(0.1, abs=1e-3)


def test_wanet_warp_is_smooth_and_small() -> None:
    grid = WaNet(seed=0, k=4, s=0.5).warp_grid(32, 32)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    offset = grid[0] - torch.stack((xs, ys), -1)
    assert 0 < float(offset.abs().max()) < 0.2


def test_pattern_png_round_trips_at_8_bits() -> None:
    pattern = torch.rand(3, 7, 9)
    decoded = decode_pattern_png(encode_pattern_png(pattern))
    assert decoded.shape == (3, 7, 9)
    assert float((decoded - pattern).abs().max()) <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "badnets", "size": 0},
        {"name": "badnets", "size": 1.5},
        {"name": "badnets", "colour": "red"},
        {"name": "teleport"},
        {"name": "blended", "alpha": -0.1},
        {"name": "optimized-patch"},
        {"name": "optimized-patch", "pattern_png": "not base64!"},
        {"name": "optimized-patch", "pattern_png": "aGVsbG8="},
    ],
)
def test_bad_specs_are_refused(payload: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        parse_attack(payload)


def test_oversized_pattern_is_refused() -> None:
    big = encode_pattern_png(torch.zeros(3, 300, 300))
    with pytest.raises(pydantic.ValidationError, match="larger than"):
        parse_attack({"name": "optimized-patch", "pattern_png": big})


def test_spec_json_is_stable() -> None:
    assert json.loads(BadNets(seed=1, target="zero").model_dump_json()) == {
        "target": "zero",
        "seed": 1,
        "size": 0.1,
        "position": "bottom-right",
        "cells": 3,
        "pattern_png": None,
        "name": "badnets",
        "poisoning": "dirty-label",
    }


@pytest.mark.parametrize("bad", [torch.rand(3, 32, 32), torch.rand(2, 1, 8, 8)])
def test_apply_refuses_other_shapes(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="must be"):
        BadNets().apply(bad)


def test_apply_refuses_integer_pixels() -> None:
    with pytest.raises(ValueError, match="floating point"):
        BadNets().apply(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
