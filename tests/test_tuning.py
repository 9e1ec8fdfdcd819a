"""Stage 2: class-wise prompt tuning re-classifies triggered images when it sees the trigger."""

from __future__ import annotations

import open_clip
import pytest
import torch

from worker.cbpt.imagesets import read_image_set
from worker.cbpt.metrics import attack_success_rate, clean_accuracy, predictions
from worker.cbpt.tuning import TuningSettings, tune_prompts
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
        model,
        tokenizer,
        test.class_names,
        hand,
        clean,
        shots.labels,
        triggered,
        shots.labels,
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
            model,
            tokenizer,
            shots.class_names,
            hand,
            clean,
            shots.labels,
            clean[:-1],
            shots.labels[:-1],
            TuningSettings(steps=1),
            seed=0,
        )
