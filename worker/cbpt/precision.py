"""Numeric precision of the frozen towers: bfloat16 autocast on CUDA, float32 elsewhere.

Only the optimisation loops (inversion, re-inversion, prompt tuning) run the frozen CLIP towers
in bfloat16. What they learn (the trigger's mask and pattern, the prompt contexts) stays a
float32 parameter, autocast keeps the losses' softmaxes in float32, and every encoder returns
float32 features. The shipped head is encoded from the tuned prompts in float32 and the
evaluation runs in float32, so the report measures the head that ``load_purified_classifier``
deploys. On a CPU, bfloat16 autocast is slower than float32 on most processors and changes
results, so ``auto`` keeps CPU runs in float32 and bit-for-bit reproducible.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

PrecisionChoice = Literal["auto", "fp32", "bf16"]
Precision = Literal["fp32", "bf16"]


def resolve_precision(device: torch.device, choice: PrecisionChoice) -> Precision:
    """``auto`` is bfloat16 on a CUDA device that supports it, float32 otherwise."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(
    device: torch.device, precision: Precision
) -> contextlib.AbstractContextManager[object]:
    """The context the towers run in: bfloat16 autocast, or nothing at all for float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_device(choice: str) -> torch.device:
    """``auto`` is CUDA when there is one; ``cuda`` without one is the operator's error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' is configured, but no CUDA device is available")
    return torch.device(choice)
