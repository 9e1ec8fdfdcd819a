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

from worker.cbpt.attack_ops import encode_pattern_png
from worker.cbpt.attacks import (
    SIG,
    AttackSpec,
    BadNets,
    Blended,
    LabelConsistent,
    OptimizedPatch,
    WaNet,
)
from worker.cbpt.deploy import load_purified_classifier
from worker.cbpt.imagesets import read_image_set
from worker.cbpt.options import (
    InversionSettings,
    PurifyOptions,
    RoundSettings,
    Runtime,
    TargetSearchSettings,
    TuningSettings,
)
from worker.cbpt.purify import PurifyResult
from worker.lab.defend import purify_lab
from worker.lab.make import LabModel, LabSettings, make_lab_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

QUICK = PurifyOptions(
    inversion=InversionSettings(steps=150, batch_size=32),
    tuning=TuningSettings(steps=100, when_clean=True),
    rounds=RoundSettings(count=1),
)
CUDA = Runtime("cuda")

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
    result = purify_lab(badnets_lab.directory, QUICK, tmp_path, runtime=CUDA)
    assert result.report.runtime == {"device": "cuda", "precision": "bf16"}
    known = result.report.triggers[1]
    assert known.asr_after <= 0.8 * known.asr_before, known
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
    short = QUICK.model_copy(
        update={
            "search": TargetSearchSettings(steps=5, batch_size=8),
            "rounds": RoundSettings(count=0),
        }
    )
    gpu = purify_lab(
        badnets_lab.directory, short, tmp_path / "gpu", runtime=Runtime("cuda", "fp32")
    )
    cpu = purify_lab(badnets_lab.directory, short, tmp_path / "cpu", runtime=Runtime("cpu"))
    assert gpu.report.runtime == {"device": "cuda", "precision": "fp32"}
    gpu_ca, cpu_ca = gpu.report.summary.ca_before, cpu.report.summary.ca_before
    assert gpu_ca is not None
    assert cpu_ca is not None
    assert abs(gpu_ca - cpu_ca) <= 0.005

    def known_before(result: PurifyResult) -> list[float]:
        return [t.asr_before for t in result.report.triggers if t.kind == "known"]

    assert known_before(gpu) == pytest.approx(known_before(cpu), abs=0.01)
