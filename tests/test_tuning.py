"""Stage 2: class-wise prompt tuning re-classifies triggered images when it sees the trigger."""

from __future__ import annotations

import open_clip
import pytest
import torch

from worker.cbpt.imagesets import read_image_set
from worker.cbpt.metrics import attack_success_rate, clean_accuracy, predictions
from worker.cbpt.options import TuningSettings
from worker.cbpt.tuning import ClassText, TuningFeatures, TuningObjective, tune_prompts
from worker.cbpt.zeroshot import class_embeddings, encode_images
from worker.lab.evaluate import load_lab_model
from worker.lab.make import LabModel


def test_tuning_with_the_trigger_removes_the_backdoor(badnets_lab: LabModel) -> None:
    model, normalizer, size = load_lab_model(badnets_lab.directory)
    model.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{badnets_lab.directory}")
    shots = read_image_set(badnets_lab.directory / "fewshot.zip", size)
    test = read_image_set(badnets_lab.directory / "test.zip", size)
    attack = badnets_lab.attack
    assert attack is not None
    target = test.class_names.index(attack.target or "")
    hand = class_embeddings(model, tokenizer, test.class_names)
    clean = encode_images(model, shots.images, normalizer)
    triggered = encode_images(model, shots.images, normalizer, transform=attack.apply)
    test_clean = encode_images(model, test.images, normalizer)
    test_triggered = encode_images(model, test.images, normalizer, transform=attack.apply)

    def measure(embeddings: torch.Tensor) -> tuple[float, float]:
        ca = clean_accuracy(predictions(test_clean, embeddings), test.labels)
        asr = attack_success_rate(predictions(test_triggered, embeddings), test.labels, target)
        return ca, asr

    ca_before, asr_before = measure(hand)
    settings = TuningSettings(steps=100, backdoor_weight=1.0)
    tuned = tune_prompts(
        ClassText(model, tokenizer, test.class_names, hand),
        TuningFeatures(clean, shots.labels, triggered, shots.labels),
        settings,
        seed=0,
    )
    ca_after, asr_after = measure(tuned.class_embeddings)
    assert asr_before >= 0.8
    assert asr_after <= 0.35 * asr_before, (asr_before, asr_after)
    assert ca_after >= ca_before - 0.15, (ca_before, ca_after)  # 4 shots a class: costly
    norms = tuned.class_embeddings.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_triggered_features_must_be_whole_blocks_of_the_clean_images(
    badnets_lab: LabModel,
) -> None:
    """Each triggered image takes its clean version's zero-shot prediction, matched by order."""
    model, normalizer, size = load_lab_model(badnets_lab.directory)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{badnets_lab.directory}")
    shots = read_image_set(badnets_lab.directory / "fewshot.zip", size)
    hand = class_embeddings(model, tokenizer, shots.class_names)
    clean = encode_images(model, shots.images, normalizer)
    with pytest.raises(ValueError, match="not whole blocks"):
        tune_prompts(
            ClassText(model, tokenizer, shots.class_names, hand),
            TuningFeatures(clean, shots.labels, clean[:-1], shots.labels[:-1]),
            TuningSettings(steps=1),
            seed=0,
        )


def test_shift_scales_extrapolate_each_triggered_feature_from_its_clean_image() -> None:
    """A scale s puts a triggered image's feature at f(x) + s (f(T(x)) - f(x)), renormalised,
    against the same target as the feature itself: each copy asks the head to hold its class
    further along the shift the trigger makes."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    triggered = torch.nn.functional.normalize(torch.randn(12, 8, generator=generator), dim=1)
    hand = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def backdoor(scales: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        settings = TuningSettings(shift_scales=scales)
        twice = labels.repeat(2)
        features = TuningFeatures(clean, labels, triggered, twice)
        objective = TuningObjective(10.0, hand, features, settings)
        assert objective.backdoor is not None
        return objective.backdoor

    plain_features, plain_targets = backdoor((1.0,))
    torch.testing.assert_close(plain_features, triggered)
    features, targets = backdoor((1.0, 2.0))
    assert features.shape == (24, 8)
    torch.testing.assert_close(features[:12], triggered)
    expected = torch.nn.functional.normalize(2 * triggered - clean.repeat(2, 1), dim=1)
    torch.testing.assert_close(features[12:], expected)
    torch.testing.assert_close(targets, plain_targets.repeat(2, 1))


@pytest.mark.parametrize("scales", [(), (0.0,), (1.0, -1.0), (11.0,)])
def test_shift_scales_must_be_positive_and_bounded(scales: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="shift"):
        TuningSettings(shift_scales=scales)


def test_target_clean_weight_scales_the_target_class_clean_terms_only() -> None:
    """Each clean image's distillation and cross-entropy count once, the suspected target's
    ``target_clean_weight`` times, over the same denominator: the other classes keep their
    pull and the triggered and regulariser terms are untouched."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    triggered = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    hand = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=1)
    text = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    scale = 10.0
    teacher = torch.softmax(scale * clean @ hand.T, dim=1)
    log_p = torch.log_softmax(scale * clean @ text.T, dim=1)
    distill = -(teacher * log_p).sum(dim=1)
    cross_entropy = -log_p.gather(1, labels[:, None]).squeeze(1)

    def loss(weight: float, target: int | None, **terms: float) -> torch.Tensor:
        settings = TuningSettings(target_clean_weight=weight, **terms)  # type: ignore[arg-type]
        features = TuningFeatures(clean, labels, triggered, labels)
        objective = TuningObjective(scale, hand, features, settings, target=target)
        return objective(text)

    only_clean = {"backdoor_weight": 0.0, "regularizer_weight": 0.0}
    weights = torch.where(labels == 2, 3.0, 1.0)
    torch.testing.assert_close(loss(3.0, 2, **only_clean), (weights * distill).mean())
    torch.testing.assert_close(
        loss(3.0, 2, clean_weight=1.0, distill_weight=0.0, **only_clean),
        (weights * cross_entropy).mean(),
    )
    torch.testing.assert_close(loss(3.0, None, **only_clean), distill.mean())
    backdoor_and_regulariser = loss(3.0, 2) - loss(3.0, 2, **only_clean)
    torch.testing.assert_close(backdoor_and_regulariser, loss(1.0, 2) - loss(1.0, 2, **only_clean))


@pytest.mark.parametrize("weight", [-0.5, 101.0])
def test_target_clean_weight_is_bounded(weight: float) -> None:
    with pytest.raises(ValueError, match="target_clean_weight"):
        TuningSettings(target_clean_weight=weight)
