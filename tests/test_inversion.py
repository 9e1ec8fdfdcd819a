"""Stage 1: the contrastive inversion finds the implanted backdoor's target without being told."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from worker.cbpt.imagesets import read_image_set
from worker.cbpt.inversion import InversionSettings, flip_statistics, info_nce, invert_trigger
from worker.cbpt.zeroshot import class_embeddings
from worker.lab.evaluate import load_lab_model
from worker.lab.make import LabModel


def test_info_nce_rewards_collapse_away_from_clean() -> None:
    generator = torch.Generator().manual_seed(0)
    clean = F.normalize(torch.randn(16, 8, generator=generator), dim=1)
    collapsed = F.normalize(
        torch.ones(16, 8) + 0.01 * torch.randn(16, 8, generator=generator), dim=1
    )
    unchanged = clean.clone()
    assert float(info_nce(collapsed, clean, 0.1)) < 0.05
    assert float(info_nce(unchanged, clean, 0.1)) > 1.0


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_info_nce_matches_its_formula(tau: float) -> None:
    generator = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(5, 4, generator=generator), dim=1)
    c = F.normalize(torch.randn(5, 4, generator=generator), dim=1)
    expected = []
    for i in range(5):
        positives = sum(torch.exp(z[i] @ z[j] / tau) for j in range(5) if j != i)
        negatives = sum(torch.exp(z[i] @ c[k] / tau) for k in range(5))
        expected.append(-torch.log(positives / (positives + negatives)))
    torch.testing.assert_close(info_nce(z, c, tau), torch.stack(expected).mean())


def test_inversion_finds_the_target_of_a_backdoored_model(
    badnets_lab: LabModel, clean_lab: LabModel
) -> None:
    settings = InversionSettings(steps=150, batch_size=32)
    rates = {}
    for name, lab in (("backdoored", badnets_lab), ("clean", clean_lab)):
        model, normalizer, size = load_lab_model(lab.directory)
        model.requires_grad_(False)
        shots = read_image_set(lab.directory / "fewshot.zip", size)
        held_out = read_image_set(lab.directory / "test.zip", size)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{lab.directory}")
        weights = class_embeddings(model, tokenizer, held_out.class_names)
        result = invert_trigger(model, normalizer, shots.images, settings, seed=0)
        target, rate = flip_statistics(
            model, normalizer, weights, held_out.images, held_out.labels, result.trigger
        )
        assert 0 < result.trigger.mask_fraction < 0.5
        rates[name] = rate
        if name == "backdoored":
            assert held_out.class_names[target] == badnets_lab.attack.target  # type: ignore[union-attr]
    assert rates["backdoored"] >= 0.8, rates
    assert rates["backdoored"] > rates["clean"], rates
