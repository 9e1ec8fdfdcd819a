"""The method: trigger inversion and class-wise prompt tuning on frozen open_clip models.

Pure torch and open_clip; no web, database or queue imports, so it runs as a library.
"""

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
