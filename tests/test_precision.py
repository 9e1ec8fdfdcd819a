"""bfloat16 autocast for the frozen towers: what it picks, and that encoders still give float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from worker.cbpt.checkpoint import load_checkpoint
from worker.cbpt.deploy import load_purified_classifier
from worker.cbpt.options import (
    InversionSettings,
    PurifyOptions,
    RoundSettings,
    Runtime,
    TuningSettings,
)
from worker.cbpt.precision import autocast, resolve_precision
from worker.cbpt.prompts import ClassPrompts, encode_prompts
from worker.cbpt.purify import Inputs, purify
from worker.cbpt.zeroshot import Normalizer, class_embeddings, encode_images
from worker.lab.make import LabModel


def test_auto_is_fp32_on_a_cpu_and_explicit_choices_stand() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == "fp32"
    assert resolve_precision(cpu, "bf16") == "bf16"
    assert resolve_precision(torch.device("cuda"), "fp32") == "fp32"


def test_fp32_runs_as_is_and_bf16_runs_matmuls_in_bfloat16() -> None:
    layer = torch.nn.Linear(8, 8)
    inputs = torch.randn(2, 8)
    with autocast(torch.device("cpu"), "fp32"):
        assert layer(inputs).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert layer(inputs).dtype == torch.bfloat16


def test_encoders_give_float32_features_close_to_fp32_under_bf16(badnets_lab: LabModel) -> None:
    loaded = load_checkpoint(badnets_lab.directory)
    model, names = loaded.model, list(badnets_lab.class_names)
    normalizer = Normalizer(loaded.preprocess.mean, loaded.preprocess.std)
    images = torch.rand(8, 3, loaded.preprocess.size, loaded.preprocess.size)
    prompts = ClassPrompts(model, loaded.tokenizer, names)

    def features() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return (
                encode_images(model, images, normalizer),
                class_embeddings(model, loaded.tokenizer, names),
                encode_prompts(model, prompts(), prompts.tokens),
            )

    exact = features()
    with autocast(torch.device("cpu"), "bf16"):
        reduced = features()
    for full, half in zip(exact, reduced, strict=True):
        assert half.dtype == torch.float32
        # bfloat16 keeps 8 bits of mantissa: the features turn a little, not around.
        assert torch.nn.functional.cosine_similarity(full, half).min() > 0.98


@pytest.mark.slow
def test_a_bf16_job_writes_float32_artifacts_and_says_how_it_ran(
    badnets_lab: LabModel, tmp_path: Path
) -> None:
    options = PurifyOptions(
        rounds=RoundSettings(count=0),
        inversion=InversionSettings(steps=20, batch_size=16),
        tuning=TuningSettings(steps=10, when_clean=True),
    )
    directory = badnets_lab.directory
    result = purify(
        Inputs(directory, directory / "fewshot.zip"),
        options,
        out_dir=tmp_path,
        runtime=Runtime("cpu", "bf16"),
    )
    assert result.report.runtime == {"device": "cpu", "precision": "bf16"}
    assert "precision" not in result.report.options  # the operator's choice, not the job's
    names = {"prompts.safetensors": "context", "head.safetensors": "class_embeddings"}
    for artifact, key in names.items():
        with safe_open(str(result.artifacts[artifact]), framework="pt") as handle:
            assert handle.get_tensor(key).dtype == torch.float32
    with safe_open(str(result.artifacts["trigger.safetensors"]), framework="pt") as handle:
        assert handle.get_tensor("mask").dtype == torch.float32
    # The head is the prompts' float32 encoding, though they were tuned under autocast.
    from_prompts = load_purified_classifier(directory, result.artifacts["prompts.safetensors"])
    from_head = load_purified_classifier(directory, result.artifacts["head.safetensors"])
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(from_prompts(images), from_head(images), atol=1e-4, rtol=1e-4)
