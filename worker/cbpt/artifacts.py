"""The files a purification hands back, in exact, documented formats.

``prompts.safetensors``
    ``context`` float32 ``(C, M, width)``; metadata ``classes`` (JSON list, row order),
    ``model_sha256``, ``n_ctx`` (decimal string), ``templates`` (JSON list).
``head.safetensors``
    ``class_embeddings`` float32 ``(C, D)``, rows L2-normalised; ``logit_scale`` float32 ``()``
    (already exponentiated: logits = logit_scale * cos); metadata ``classes``, ``model_sha256``.
``trigger.safetensors``
    ``mask`` float32 ``(H, W)`` and ``pattern`` float32 ``(3, H, W)``, both in [0, 1]; metadata
    ``model_sha256``.
``trigger.png``
    the pattern where the mask is on, the mask itself, and a triggered example, side by side.
``report.json``, ``report.html``
    the report (``outcome.Report``), as JSON with sorted keys and as one self-contained page.

safetensors metadata is a string map, so lists travel as JSON text. The safetensors library
writes metadata in hash-map order, which changes from run to run; these files are serialised
here instead, with sorted keys, so that a seed pins their bytes. Readers use the library as
usual. Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from worker.cbpt.inversion import Trigger
from worker.cbpt.outcome import Report
from worker.cbpt.report import render_html

PROMPTS_FILE = "prompts.safetensors"
HEAD_FILE = "head.safetensors"
TRIGGER_FILE = "trigger.safetensors"
TRIGGER_PNG = "trigger.png"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def write_prompts(
    path: Path,
    context: torch.Tensor,
    classes: Sequence[str],
    model_sha256: str,
    templates: Sequence[str],
) -> None:
    metadata = {
        "classes": json.dumps(list(classes)),
        "model_sha256": model_sha256,
        "n_ctx": str(context.shape[1]),
        "templates": json.dumps(list(templates)),
    }
    _save(path, {"context": context.detach().float().cpu().contiguous()}, metadata)


def write_head(
    path: Path,
    class_embeddings: torch.Tensor,
    logit_scale: float,
    classes: Sequence[str],
    model_sha256: str,
) -> None:
    tensors = {
        "class_embeddings": class_embeddings.detach().float().cpu().contiguous(),
        "logit_scale": torch.tensor(float(logit_scale), dtype=torch.float32),
    }
    metadata = {"classes": json.dumps(list(classes)), "model_sha256": model_sha256}
    _save(path, tensors, metadata)


def write_trigger(path: Path, trigger: Trigger, model_sha256: str) -> None:
    tensors = {
        "mask": trigger.mask.detach().float().cpu().contiguous(),
        "pattern": trigger.pattern.detach().float().cpu().contiguous(),
    }
    _save(path, tensors, {"model_sha256": model_sha256})


def read_classes(path: Path) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Tensors, class names and metadata of a prompts or head file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    classes = json.loads(metadata.get("classes", "[]"))
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path.name} has no valid 'classes' metadata")
    return load_file(str(path)), classes, metadata


def trigger_png(trigger: Trigger, example: torch.Tensor | None = None, scale: int = 4) -> bytes:
    """A picture for a human: masked pattern, mask, and (optionally) a triggered example."""
    panels = [trigger.mask[None] * trigger.pattern, trigger.mask[None].expand(3, -1, -1)]
    if example is not None:
        panels.append(trigger.apply(example[None].float())[0])
    height = trigger.mask.shape[0]
    gap = torch.ones(3, height, max(1, height // 16))
    strip = torch.cat([p for panel in panels for p in (panel.cpu().float(), gap)][:-1], dim=2)
    pixels = (strip.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """float32 tensors in the safetensors format, byte-for-byte reproducible.

    Layout: an 8-byte little-endian header length, a JSON header (``__metadata__`` first, with
    sorted keys, then tensors in name order), space-padded to a multiple of 8, then the raw
    little-endian data in the same order.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype != torch.float32:
            raise TypeError(f"{name} is {tensor.dtype}; artifacts hold float32 only")
        data = tensor.detach().cpu().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    write_bytes(path, serialize(tensors, metadata))


@dataclass(frozen=True)
class Purified:
    """What a job ships besides its report: the tuned context and the head it gives, the
    inverted trigger, and what the files are stamped with."""

    context: torch.Tensor
    embeddings: torch.Tensor
    logit_scale: float
    trigger: Trigger
    example: torch.Tensor  # one image in [0, 1] (3, H, W), shown triggered in trigger.png
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    model_sha256: str


def write_all(out_dir: Path, report: Report, purified: Purified) -> dict[str, Path]:
    """Writes every artifact and the report into ``out_dir``; returns their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = (PROMPTS_FILE, HEAD_FILE, TRIGGER_FILE, TRIGGER_PNG, REPORT_JSON, REPORT_HTML)
    paths = {name: out_dir / name for name in names}
    sha = purified.model_sha256
    classes = purified.classes
    write_prompts(paths[PROMPTS_FILE], purified.context, classes, sha, purified.templates)
    write_head(paths[HEAD_FILE], purified.embeddings, purified.logit_scale, classes, sha)
    write_trigger(paths[TRIGGER_FILE], purified.trigger, sha)
    picture = trigger_png(purified.trigger, purified.example)
    write_bytes(paths[TRIGGER_PNG], picture)
    data = report.model_dump(mode="json")
    write_bytes(paths[REPORT_JSON], (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    write_bytes(paths[REPORT_HTML], render_html(data, picture).encode())
    return paths
