"""The engine on a CUDA device: where every tensor lives, and bf16 autocast end to end.

Skipped where no CUDA device is present (CI has none). It needs nothing from the service, so it
runs on a GPU machine with the engine's dependencies alone:

    python -m pytest --noconftest tests/gpu
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from worker.cbpt.attacks import (
    SIG,
    AttackSpec,
    BadNets,
    Blended,
    LabelConsistent,
    OptimizedPatch,
    WaNet,
    encode_pattern_png,
)
from worker.cbpt.deploy import load_purified_classifier
from worker.cbpt.imagesets import read_image_set
from worker.cbpt.inversion import InversionSettings
from worker.cbpt.purify import PurifyOptions, PurifyResult
from worker.cbpt.tuning import TuningSettings
from worker.lab.defend import purify_lab
from worker.lab.make import LabModel, LabSettings, make_lab_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

QUICK = PurifyOptions(
    device="cuda",
    inversion=InversionSettings(steps=150, batch_size=32),
    tuning=TuningSettings(steps=100),
    rounds=1,
    tune_when_clean=True,
)

SPECS: list[AttackSpec] = [
    BadNets(target="0", seed=3, size=0.2, position="random"),
    LabelConsistent(target="0", seed=3, size=0.3),
    Blended(target="0", seed=3, alpha=0.2),
    SIG(target="0", seed=3),
    WaNet(target="0", seed=3, k=4, s=6.0),
    OptimizedPatch(target="0", pattern_png=encode_pattern_png(torch.rand(3, 8, 8))),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_every_attack_applies_on_cuda_as_on_the_cpu(spec: AttackSpec) -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    on_gpu = spec.apply(images.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), spec.apply(images), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def badnets_lab(tmp_path_factory: pytest.TempPathFactory) -> LabModel:
    root = tmp_path_factory.mktemp("lab")
    return make_lab_model("badnets", root / "badnets", LabSettings.tiny(), cache_dir=root / "cache")


def test_a_bf16_job_on_cuda_purifies_and_deploys(badnets_lab: LabModel, tmp_path: Path) -> None:
    result = purify_lab(badnets_lab.directory, QUICK, tmp_path)
    assert result.report["runtime"] == {"device": "cuda", "precision": "bf16"}
    known = result.report["triggers"][1]
    assert known["asr_after"] <= 0.8 * known["asr_before"], known
    for artifact, key in (("prompts", "context"), ("head", "class_embeddings")):
        with safe_open(str(result.artifacts[f"{artifact}.safetensors"]), framework="pt") as handle:
            assert handle.get_tensor(key).dtype == torch.float32
    directory = badnets_lab.directory
    images = read_image_set(directory / "test.zip", 16).images[:64].float().div(255).cuda()
    from_prompts = load_purified_classifier(
        directory, result.artifacts["prompts.safetensors"], device="cuda"
    )
    from_head = load_purified_classifier(
        directory, result.artifacts["head.safetensors"], device="cuda"
    )
    with torch.no_grad():
        torch.testing.assert_close(from_prompts(images), from_head(images), atol=1e-3, rtol=1e-3)


def test_zero_shot_accuracy_on_cuda_in_fp32_is_the_cpu_one(
    badnets_lab: LabModel, tmp_path: Path
) -> None:
    """Before any tuning, the same model scores the same held-out images alike on both."""
    short = {"inversion": InversionSettings(steps=5, batch_size=32), "rounds": 0}
    on_gpu = QUICK.model_copy(update={**short, "precision": "fp32"})
    on_cpu = on_gpu.model_copy(update={"device": "cpu"})
    gpu = purify_lab(badnets_lab.directory, on_gpu, tmp_path / "gpu")
    cpu = purify_lab(badnets_lab.directory, on_cpu, tmp_path / "cpu")
    assert gpu.report["runtime"] == {"device": "cuda", "precision": "fp32"}
    assert abs(gpu.summary["ca_before"] - cpu.summary["ca_before"]) <= 0.005  # type: ignore[operator]

    def known_before(result: PurifyResult) -> list[float]:
        return [t["asr_before"] for t in result.report["triggers"] if t["kind"] == "known"]

    assert known_before(gpu) == pytest.approx(known_before(cpu), abs=0.01)
