"""The numbers a report stands on: clean accuracy, attack success rate and TrojAI's fidelity."""

from __future__ import annotations

import torch


def predictions(features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Top-1 classes of L2-normalised image features ``(N, D)`` against ``(C, D)``."""
    return (features @ class_embeddings.T).argmax(dim=1)


def clean_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted.cpu() == labels.cpu()).float().mean())


def per_class_accuracy(
    predicted: torch.Tensor, labels: torch.Tensor, n_classes: int
) -> list[float]:
    correct = (predicted.cpu() == labels.cpu()).float()
    labels = labels.cpu()
    return [
        float(correct[labels == c].mean()) if bool((labels == c).any()) else float("nan")
        for c in range(n_classes)
    ]


def attack_success_rate(predicted: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """Share of triggered images whose true class is not ``target`` that land in ``target``."""
    others = labels.cpu() != target
    if not bool(others.any()):
        return 0.0
    return float((predicted.cpu()[others] == target).float().mean())


def fidelity(
    asr_before: float, asr_after: float, ca_before: float, ca_after: float
) -> float | None:
    """NIST TrojAI's mitigation score: ASR removed, weighted by the clean accuracy kept.

    ``((ASR_before - ASR_after) / ASR_before) * (CA_after / CA_before)``; undefined (None) where
    there was no attack success or no accuracy to begin with.
    """
    if asr_before <= 0 or ca_before <= 0:
        return None
    return (asr_before - asr_after) / asr_before * (ca_after / ca_before)
