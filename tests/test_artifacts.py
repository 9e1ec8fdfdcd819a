"""Artifact files are a contract: their exact bytes are pinned for fixed inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from worker.cbpt import artifacts
from worker.cbpt.inversion import Trigger

SHA = "ab" * 32
CLASSES = ["cat", "dog"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_head_bytes_are_pinned(tmp_path: Path) -> None:
    rows = torch.nn.functional.normalize(torch.arange(6, dtype=torch.float32).view(2, 3) + 1, dim=1)
    path = tmp_path / "head.safetensors"
    artifacts.write_head(path, rows, 50.0, CLASSES, SHA)
    assert path.read_bytes()[8:58] == b'{"__metadata__":{"classes":"[\\"cat\\", \\"dog\\"]","m'
    assert _digest(path) == "66ed9e336f17d3c492a1329909c88fe4ba60feb3eea7f0da022787cf9bbf3744"
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["classes"]) == CLASSES
        torch.testing.assert_close(handle.get_tensor("class_embeddings"), rows)
        assert float(handle.get_tensor("logit_scale")) == 50.0


def test_prompts_bytes_are_pinned(tmp_path: Path) -> None:
    context = torch.arange(16, dtype=torch.float32).view(2, 2, 4) / 16
    path = tmp_path / "prompts.safetensors"
    artifacts.write_prompts(path, context, CLASSES, SHA, ["a photo of a {}."])
    assert _digest(path) == "ccb4194157679b24d7117352efdc66cefa649342524c799fe84559caa7169010"
    tensors, classes, metadata = artifacts.read_classes(path)
    assert classes == CLASSES
    assert metadata["n_ctx"] == "2"
    assert torch.equal(tensors["context"], context)


def test_trigger_bytes_are_pinned(tmp_path: Path) -> None:
    path = tmp_path / "trigger.safetensors"
    artifacts.write_trigger(
        path, Trigger(torch.full((2, 2), 0.25), torch.full((3, 2, 2), 0.5)), SHA
    )
    assert _digest(path) == "58a2c444f463f737d030ea96c554902d2cf8a9f4ed36b77794be956c9c078e5b"


def test_header_is_aligned_and_only_float32_is_written() -> None:
    data = artifacts.serialize({"x": torch.zeros(3)}, {"k": "v"})
    header_length = int.from_bytes(data[:8], "little")
    assert header_length % 8 == 0
    assert len(data) == 8 + header_length + 12
    with pytest.raises(TypeError, match="float32 only"):
        artifacts.serialize({"x": torch.zeros(3, dtype=torch.float64)}, {})


def test_trigger_png_is_a_png() -> None:
    trigger = Trigger(torch.rand(8, 8), torch.rand(3, 8, 8))
    data = artifacts.trigger_png(trigger, torch.rand(3, 8, 8))
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
