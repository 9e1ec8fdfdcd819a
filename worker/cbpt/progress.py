"""How a purification reports progress and learns that it should stop.

Part of the torch-free contract. ``purify`` calls ``progress(stage, fraction)`` as each stage
advances (fraction in [0, 1], 1.0 when it ends) and polls ``should_cancel()`` between steps;
when it returns true the engine raises ``CancelledError`` and writes nothing. ``STAGE_SPANS``
places each stage in the whole job, so that a caller can show one overall fraction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

Stage = Literal["load", "inversion", "tuning", "evaluation", "artifacts"]
Progress = Callable[[str, float], None]
ShouldCancel = Callable[[], bool]

# Share of the whole job each stage takes, from timings on the lab models.
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "load": (0.0, 0.05),
    "inversion": (0.05, 0.35),
    "tuning": (0.35, 0.85),
    "evaluation": (0.85, 0.97),
    "artifacts": (0.97, 1.0),
}


class CancelledError(InterruptedError):
    """The caller asked to stop between steps; nothing was written."""


def overall_fraction(stage: str, fraction: float) -> float:
    """Where ``fraction`` of ``stage`` lies in the whole job, in [0, 1]."""
    start, end = STAGE_SPANS.get(stage, (0.0, 1.0))
    return start + (end - start) * max(0.0, min(1.0, fraction))
