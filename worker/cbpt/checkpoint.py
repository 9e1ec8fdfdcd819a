"""Loading suspicious open_clip checkpoints without ever executing them.

Accepted weights: safetensors (preferred), or a PyTorch state-dict file loaded only with
``torch.load(weights_only=True)``; alone, or in open_clip's hub layout (a folder, or a zip or tar
of one, with ``open_clip_config.json``). Accepted architectures: an open_clip model name, a bare
model config JSON, or the hub config (``model_cfg`` plus ``preprocess_cfg``, whose size, mean
and std are honoured).

Refused with a typed error, never executed: TorchScript archives, pickles that need globals,
missing or unexpected keys, shape mismatches (the error names the keys) and NaN or Inf weights.
There is no fallback to ``weights_only=False`` anywhere, on purpose.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from worker.cbpt.archives import ArchiveError, is_archive, open_archive
from worker.cbpt.errors import EngineError
from worker.cbpt.formats import sniff_weights
from worker.cbpt.layout import (
    CHECKPOINT_ARCHIVE_LIMITS,
    HUB_CONFIG,
    HUB_WEIGHTS,
    WEIGHT_SUFFIXES,
)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


class CheckpointError(EngineError):
    """The checkpoint cannot be used."""

    code = "CHECKPOINT_INVALID"


class UnsupportedFormatError(CheckpointError):
    code = "CHECKPOINT_FORMAT_UNSUPPORTED"


class UnsafeCheckpointError(CheckpointError):
    code = "CHECKPOINT_UNSAFE"


class ArchitectureMismatchError(CheckpointError):
    code = "CHECKPOINT_ARCHITECTURE_MISMATCH"


class NonFiniteWeightsError(CheckpointError):
    code = "CHECKPOINT_NON_FINITE"


@dataclass(frozen=True)
class Preprocess:
    """What the checkpoint says its images need: size, normalisation and resampling."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: open_clip.CLIP
    preprocess: Preprocess
    tokenizer: Any
    model_cfg: dict[str, Any]
    sha256: str  # fingerprint of the weights themselves, whatever file they came in


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads tensors from a weights file without executing anything it holds."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        raise UnsafeCheckpointError("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: refusing to load")
    kind = sniff_weights(path)
    if kind == "torchscript":
        raise UnsafeCheckpointError(
            "TorchScript archives carry code and are refused; export the state dict "
            "(model.state_dict()) to safetensors instead"
        )
    if kind == "safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UnsupportedFormatError(f"unreadable safetensors file: {exc}") from exc
    if kind not in ("torch-zip", "pickle"):
        raise UnsupportedFormatError(
            "weights must be a .safetensors file or a PyTorch state-dict file"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        blocked = _unsafe_globals(path)
        raise UnsafeCheckpointError(
            "the pickle needs globals that a weights-only load refuses"
            + (f": {', '.join(blocked[:8])}" if blocked else "")
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise UnsupportedFormatError(f"unreadable PyTorch file: {exc}") from exc
    return _tensors_only(loaded)


def load_checkpoint(
    weights: Path,
    architecture: str | Path | dict[str, Any] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Builds the open_clip model and loads ``weights`` into it, strictly.

    ``weights`` is a weights file, a hub folder, or a zip or tar of a hub folder. ``architecture``
    is an open_clip model name, a config JSON path or dict (bare or hub-style); it may be left out
    when the weights come with ``open_clip_config.json``.
    """
    if not weights.exists():
        raise UnsupportedFormatError(f"{weights} does not exist")
    if weights.is_dir():
        return _load_hub_folder(weights, architecture, device)
    if is_archive(weights) and sniff_weights(weights) not in ("torch-zip", "torchscript"):
        with tempfile.TemporaryDirectory(prefix="antidote-ckpt-") as scratch:
            try:
                with open_archive(weights, CHECKPOINT_ARCHIVE_LIMITS) as archive:
                    archive.extract(Path(scratch))
            except ArchiveError as exc:
                raise UnsupportedFormatError(f"checkpoint archive refused: {exc}") from exc
            return _load_hub_folder(_hub_root(Path(scratch)), architecture, device)
    if architecture is None:
        raise ArchitectureMismatchError(
            "a bare weights file needs an architecture: an open_clip model name or a config JSON"
        )
    model_cfg, preprocess_cfg = _resolve_architecture(architecture)
    return _build(read_state_dict(weights), model_cfg, preprocess_cfg, device)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A fingerprint of the weights: names, dtypes, shapes and bytes, in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_hub_folder(
    folder: Path, architecture: str | Path | dict[str, Any] | None, device: str | torch.device
) -> LoadedCheckpoint:
    config_path = folder / HUB_CONFIG
    if architecture is None:
        if not config_path.is_file():
            raise ArchitectureMismatchError(f"{HUB_CONFIG} is missing and no architecture given")
        architecture = config_path
    model_cfg, preprocess_cfg = _resolve_architecture(architecture)
    for name in HUB_WEIGHTS:
        if (folder / name).is_file():
            return _build(read_state_dict(folder / name), model_cfg, preprocess_cfg, device)
    # Training runs name their weights after the epoch; a single such file is unambiguous.
    others = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES]
    if len(others) == 1:
        return _build(read_state_dict(others[0]), model_cfg, preprocess_cfg, device)
    raise UnsupportedFormatError(
        f"expected one weights file: {', '.join(HUB_WEIGHTS)}, or a single .safetensors, "
        f".bin, .pt or .pth file; found {len(others)} others"
    )


def _hub_root(root: Path) -> Path:
    """The folder holding the config: the archive's root, or its single top-level folder."""
    if (root / HUB_CONFIG).is_file():
        return root
    children = [p for p in root.iterdir() if p.is_dir()]
    if len(children) == 1 and (children[0] / HUB_CONFIG).is_file():
        return children[0]
    raise UnsupportedFormatError(f"the checkpoint archive holds no {HUB_CONFIG}")


def _resolve_architecture(
    architecture: str | Path | dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    if isinstance(architecture, str) and Path(architecture).suffix != ".json":
        model_cfg = open_clip.get_model_config(architecture)
        if model_cfg is None:
            raise ArchitectureMismatchError(f"unknown open_clip model name {architecture!r}")
        return dict(model_cfg), {}
    if isinstance(architecture, dict):
        config = architecture
    else:
        try:
            config = json.loads(Path(architecture).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArchitectureMismatchError(f"unreadable model config: {exc}") from exc
    if not isinstance(config, dict):
        raise ArchitectureMismatchError("the model config must be a JSON object")
    if "model_cfg" in config:
        preprocess = config.get("preprocess_cfg") or {}
        if not isinstance(config["model_cfg"], dict) or not isinstance(preprocess, dict):
            raise ArchitectureMismatchError("model_cfg and preprocess_cfg must be JSON objects")
        return config["model_cfg"], preprocess
    return config, {}


def _build(
    state: dict[str, torch.Tensor],
    model_cfg: dict[str, Any],
    preprocess_cfg: dict[str, Any],
    device: str | torch.device,
) -> LoadedCheckpoint:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    bad = sorted(
        k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()
    )
    if bad:
        raise NonFiniteWeightsError(f"NaN or Inf in {', '.join(bad[:8])}")
    try:
        model = open_clip.CLIP(**model_cfg)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise ArchitectureMismatchError(
            f"model config cannot build an open_clip CLIP: {exc}"
        ) from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:8])}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched[:8])}")
    if problems:
        raise ArchitectureMismatchError(
            "weights do not fit the architecture: " + " | ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False).to(device)
    vision = model_cfg.get("vision_cfg", {})
    default_size = vision.get("image_size", 224)
    size = preprocess_cfg.get("size", default_size)
    defaults = open_clip.transform.PreprocessCfg()
    preprocess = Preprocess(
        size=int(size if isinstance(size, int) else size[0]),
        mean=tuple(preprocess_cfg.get("mean", defaults.mean)),
        std=tuple(preprocess_cfg.get("std", defaults.std)),
        interpolation=str(preprocess_cfg.get("interpolation", "bicubic")),
    )
    context_length = model_cfg.get("text_cfg", {}).get("context_length", 77)
    tokenizer = open_clip.get_tokenizer("", context_length=context_length)
    return LoadedCheckpoint(model, preprocess, tokenizer, model_cfg, state_dict_sha256(state))


def _tensors_only(loaded: Any) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict):
        raise UnsupportedFormatError("the file does not hold a state dict (a mapping of tensors)")
    tensors = {
        k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
    }
    if not tensors:
        raise UnsupportedFormatError("the state dict holds no tensors")
    return tensors


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return []
