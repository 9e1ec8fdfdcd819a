"""Hostile checkpoints: pickles that run code, TorchScript, and safetensors files that lie.

The API reads headers only and never unpickles, so a pickle is accepted there (it cannot tell a
state dict from a payload without running it) and must fail in the worker, whose only loader is
``torch.load(weights_only=True)``. Every pickle payload here would create its canary if anything
unpickled it for real; the autouse checks prove none did.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.service.security.conftest import Deployment, assert_failed, assert_problem
from tests.service.security.payloads import (
    TINY_HUB_CONFIG,
    TINY_MODEL_CFG,
    Entry,
    TrapModule,
    class_images,
    hiding_safetensors,
    holey_safetensors,
    huge_header_length,
    overlapping_safetensors,
    payload,
    raw_pickle,
    torch_saved,
    torchscript,
    truncated_safetensors,
    zip_archive,
)

DATASET = zip_archive(class_images())
TINY_CONFIG = json.dumps(TINY_MODEL_CFG).encode()
"""Bare-weights jobs name this architecture, so a job that wrongly got past loading would
build a model in milliseconds rather than a ViT-B-32."""

PAYLOADS = ["os.system", "builtins.exec"]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("kind", PAYLOADS)
def test_a_raw_pickle_passes_the_api_and_the_worker_refuses_it(
    service: Deployment, canary: Path, kind: str, protocol: int
) -> None:
    """Protocols 2-5 all start ``\\x80 <n>``; the worker's weights-only load meets the global."""
    body = raw_pickle(payload(kind, canary), protocol)
    job = service.run(service.submit(body, DATASET, model=None, model_config=TINY_CONFIG))
    assert_failed(job, "CHECKPOINT_UNSAFE")
    assert not canary.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_a_global_nested_in_a_state_dict_fails_as_unsafe(
    service: Deployment, canary: Path, kind: str
) -> None:
    """A real torch zip with real tensors passes the API's sniff; one entry is a payload."""
    body = torch_saved({"w": torch.zeros(2), "x": payload(kind, canary)})
    job = service.run(service.submit(body, DATASET, model=None, model_config=TINY_CONFIG))
    assert_failed(job, "CHECKPOINT_UNSAFE")
    assert not canary.exists()


def test_a_bin_holding_a_whole_module_fails_as_unsafe(service: Deployment, canary: Path) -> None:
    """``torch.save(module)`` pickles classes by reference; unpickling it would run our hook."""
    body = torch_saved(TrapModule(canary))
    job = service.run(service.submit(body, DATASET, model=None, model_config=TINY_CONFIG))
    error = assert_failed(job, "CHECKPOINT_UNSAFE")
    assert "TrapModule" in error["detail"]
    assert not canary.exists()


@pytest.mark.parametrize("weights", ["module", "raw-pickle", "nested-global", "torchscript"])
def test_weights_inside_a_hub_archive_are_loaded_as_safely(
    service: Deployment, canary: Path, weights: str
) -> None:
    """The API checks a hub archive's layout, not the weights in it: the worker must refuse."""
    data = {
        "module": lambda: torch_saved(TrapModule(canary)),
        "raw-pickle": lambda: raw_pickle(payload("os.system", canary), 2),
        "nested-global": lambda: torch_saved(
            {"w": torch.ones(1), "x": payload("builtins.exec", canary)}
        ),
        "torchscript": torchscript,
    }[weights]()
    hub = zip_archive(
        [
            Entry("hub/open_clip_config.json", json.dumps(TINY_HUB_CONFIG).encode()),
            Entry("hub/open_clip_pytorch_model.bin", data),
        ]
    )
    job = service.run(service.submit(hub, DATASET, model=None))
    assert_failed(job, "CHECKPOINT_UNSAFE")
    assert not canary.exists()


def test_torchscript_is_refused_at_submission(service: Deployment) -> None:
    response = service.submit(torchscript(), DATASET)
    assert_problem(response, 422, "CHECKPOINT_TORCHSCRIPT")


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (truncated_safetensors, "CHECKPOINT_TRUNCATED"),
        (huge_header_length, "CHECKPOINT_TRUNCATED"),
        (overlapping_safetensors, "CHECKPOINT_HEADER_INVALID"),
        (holey_safetensors, "CHECKPOINT_HEADER_INVALID"),
        (hiding_safetensors, "CHECKPOINT_HEADER_INVALID"),
    ],
    ids=["truncated", "header-length-past-the-end", "overlap", "hole", "hidden-bytes"],
)
def test_a_lying_safetensors_file_is_refused_at_submission(
    service: Deployment, build: Callable[[], bytes], code: str
) -> None:
    assert_problem(service.submit(build(), DATASET), 422, code)


def test_an_empty_upload_is_refused(service: Deployment) -> None:
    assert_problem(service.put(b""), 400, "UPLOAD_EMPTY")


def test_an_empty_part_in_a_one_shot_submission_is_refused(service: Deployment) -> None:
    """Multipart parts skip ``PUT``'s emptiness check; the checkpoint check catches it."""
    response = service.http.post(
        "/v1/jobs",
        headers=service.auth(),
        files={
            "checkpoint": ("model.safetensors", b"", "application/octet-stream"),
            "dataset": ("data.zip", DATASET, "application/zip"),
            "request": (None, json.dumps({"model": "ViT-B-32"}), "application/json"),
        },
    )
    assert_problem(response, 422, "CHECKPOINT_EMPTY")


def test_bytes_that_are_no_known_format_are_refused(service: Deployment) -> None:
    response = service.submit(b"#!/bin/sh\nrm -rf /\n" * 4, DATASET)
    assert_problem(response, 422, "CHECKPOINT_FORMAT_UNSUPPORTED")


@pytest.mark.parametrize("kind", [*PAYLOADS, "module"])
def test_the_payloads_are_live(tmp_path: Path, kind: str) -> None:
    """The absent canaries above mean something only if an unsafe load would create them."""
    canary = tmp_path / "canary"
    if kind == "module":
        data = torch_saved(TrapModule(canary))
        torch.load(io.BytesIO(data), weights_only=False)
    else:
        data = torch_saved({"w": torch.zeros(1), "x": payload(kind, canary)})
        torch.load(io.BytesIO(data), weights_only=False)
        assert canary.exists()
        canary.unlink()
        pickle.loads(raw_pickle(payload(kind, canary), 2))  # our own payload: proving it runs
    assert canary.exists()
