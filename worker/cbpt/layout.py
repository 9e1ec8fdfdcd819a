"""What the uploads look like: hub folder names, weight and image suffixes, archive limits.

Torch-free, so that the API's up-front checks (``service.validation``) and the worker's loaders
(``checkpoint``, ``imagesets``) read one definition and can never disagree on what they accept.
"""

from __future__ import annotations

from worker.cbpt.archives import ArchiveLimits

HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
"""open_clip's hub weight names, in the order the worker looks for them."""

WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth"})
"""A single weights file of another name (``epoch_32.pt``) beside the config is taken too."""

CHECKPOINT_ARCHIVE_LIMITS = ArchiveLimits(max_members=64)
"""A hub folder holds a config, weights and a few text files."""

CLASSES_FILE = "classes.json"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

DATASET_ARCHIVE_LIMITS = ArchiveLimits(max_member_bytes=64 * 1024**2)
"""No few-shot image needs more than 64 MiB."""
