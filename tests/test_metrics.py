"""Report metrics on hand-checked cases."""

from __future__ import annotations

import pytest
import torch

from worker.cbpt.metrics import (
    attack_success_rate,
    clean_accuracy,
    fidelity,
    per_class_accuracy,
    predictions,
)


def test_predictions_and_accuracy() -> None:
    embeddings = torch.eye(3)
    features = torch.tensor([[1.0, 0, 0], [0, 0.9, 0.1], [0, 1, 0], [0.2, 0, 0.8]])
    predicted = predictions(features, embeddings)
    assert predicted.tolist() == [0, 1, 1, 2]
    labels = torch.tensor([0, 1, 2, 2])
    assert clean_accuracy(predicted, labels) == 0.75
    assert per_class_accuracy(predicted, labels, 3) == [1.0, 1.0, 0.5]


def test_asr_ignores_images_of_the_target_class() -> None:
    predicted = torch.tensor([2, 2, 0, 2])
    labels = torch.tensor([0, 1, 1, 2])
    assert attack_success_rate(predicted, labels, target=2) == pytest.approx(2 / 3)
    assert attack_success_rate(predicted, torch.full((4,), 2), target=2) == 0.0


def test_fidelity_follows_trojai() -> None:
    assert fidelity(0.9, 0.0, 0.8, 0.8) == pytest.approx(1.0)
    assert fidelity(1.0, 0.5, 0.8, 0.4) == pytest.approx(0.25)
    assert fidelity(0.0, 0.0, 0.8, 0.8) is None
