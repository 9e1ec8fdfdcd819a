"""What the uploads look like: hub folder names, weight and image suffixes, archive limits, and
the architecture names open_clip knows.

Torch-free, so that the API's up-front checks (``service.validation``) and the worker's loaders
(``checkpoint``, ``imagesets``) read one definition and can never disagree on what they accept.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

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


@functools.cache
def open_clip_model_names() -> frozenset[str]:
    """The architecture names ``open_clip.list_models()`` gives, read from the config files
    open_clip ships, without executing its package (which imports torch): a config counts when
    it names ``embed_dim``, ``vision_cfg`` and ``text_cfg``, as open_clip's registry requires.
    ``tests/test_options.py`` holds the two to the same list."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    names = set()
    for path in folder.glob("*.json"):
        config = json.loads(path.read_text())
        if all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
            names.add(path.stem)
    return frozenset(names)
