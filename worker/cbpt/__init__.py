"""The method: trigger inversion and class-wise prompt tuning on frozen open_clip models.

Pure torch and open_clip; no web, database or queue imports, so it runs as a library. Names are
loaded on first use (PEP 562), so that the API process can use the torch-free modules (archive
vetting) without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from worker.cbpt.imagesets import ImageSet, ImageSetError, ImageSetLimits, read_image_set

_HOMES = {
    "ATTACK_NAMES": "attacks",
    "SIG": "attacks",
    "AttackSpec": "attacks",
    "BadNets": "attacks",
    "Blended": "attacks",
    "LabelConsistent": "attacks",
    "OptimizedPatch": "attacks",
    "WaNet": "attacks",
    "parse_attack": "attacks",
    "ImageSet": "imagesets",
    "ImageSetError": "imagesets",
    "ImageSetLimits": "imagesets",
    "read_image_set": "imagesets",
}

__all__ = [
    "ATTACK_NAMES",
    "SIG",
    "AttackSpec",
    "BadNets",
    "Blended",
    "ImageSet",
    "ImageSetError",
    "ImageSetLimits",
    "LabelConsistent",
    "OptimizedPatch",
    "WaNet",
    "parse_attack",
    "read_image_set",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"worker.cbpt.{home}"), name)
