"""Writing lab output in the formats the service accepts: open_clip hub folders and image archives.

Every writer is byte-deterministic (sorted keys, fixed zip timestamps, no wall-clock metadata), so
the same seed gives the same files, and a checksum names a model.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def preprocess_cfg(image_size: int, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    return {
        "size": image_size,
        "mean": [round(float(v), 4) for v in mean],
        "std": [round(float(v), 4) for v in std],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def write_hub_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    preprocess: dict[str, Any],
) -> None:
    """Writes ``open_clip_config.json`` and ``open_clip_model.safetensors`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    _atomic_write(
        directory / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    temporary = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, directory / WEIGHTS_FILE)


def write_image_archive(
    path: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    folders: Sequence[str],
    class_names: Sequence[str],
) -> None:
    """Writes ``uint8`` images ``(N, 3, H, W)`` as ``<folder>/<NNNNN>.png`` and ``classes.json``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        mapping = dict(zip(folders, class_names, strict=True))
        _add(archive, "classes.json", (json.dumps(mapping, indent=2) + "\n").encode())
        counters = [0] * len(folders)
        pixels = images.permute(0, 2, 3, 1).cpu().numpy()
        for array, label in zip(pixels, labels.tolist(), strict=True):
            name = f"{folders[label]}/{counters[label]:05d}.png"
            counters[label] += 1
            _add(archive, name, _png(array))
    _atomic_write(path, buffer.getvalue())


def write_json(path: Path, payload: Any) -> None:
    _atomic_write(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode="RGB").save(out, format="PNG", optimize=False)
    return out.getvalue()


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
