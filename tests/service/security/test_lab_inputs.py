"""Cases that need a real model to get past loading: the session's tiny backdoored lab CLIP.

The API never decodes an image, so what hides in pixels (a decompression bomb, a truncated
JPEG) is the worker's to refuse, naming the file; what is merely unusual (CMYK, 16-bit grey,
palette images) must work. Inputs that are valid one by one but do not fit the model (a class
name too long for its text context, a trigger aimed at no class, weights of another
architecture) must fail the job with a stable code, never ``INTERNAL``.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import pytest
from safetensors.torch import save as save_tensors

from tests.service.security.conftest import FAST_OPTIONS, Deployment, assert_failed
from tests.service.security.payloads import (
    Entry,
    bomb_png,
    convert_image,
    image_mode,
    payload,
    raw_pickle,
    truncated_jpeg,
    zip_archive,
)
from worker.lab.make import LabModel

pytestmark = pytest.mark.slow  # the session's lab model is trained on first use

MIN_CA = 0.6
"""The lab model scores 0.95-1.0 on its held-out shots; at chance, 10 classes score 0.1-0.2."""

LOADING = ("queued", "load")
"""Where a job that fails while loading stopped: its first progress write may not have come."""


@dataclass(frozen=True)
class Lab:
    """The lab model's files as bytes, and its few-shot set as archive entries."""

    config: bytes
    weights: bytes
    fewshot: list[Entry]

    def dataset(self, *extra: Entry, names: dict[str, str] | None = None) -> bytes:
        entries = [e for e in self.fewshot if names is None or e.name != "classes.json"]
        if names is not None:
            entries.append(Entry("classes.json", json.dumps(names).encode()))
        return zip_archive([*entries, *extra])

    def submit(
        self,
        service: Deployment,
        dataset: bytes,
        *,
        options: dict[str, Any] | None = None,
        known_triggers: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Submits with the lab's weights and config and fast options; waits for the end."""
        response = service.submit(
            self.weights,
            dataset,
            model=None,
            model_config=self.config,
            options={**FAST_OPTIONS, **(options or {})},
            known_triggers=known_triggers,
        )
        return service.run(response)


@pytest.fixture(scope="module")
def lab(badnets_lab: LabModel) -> Lab:
    folder = badnets_lab.directory
    with zipfile.ZipFile(folder / "fewshot.zip") as archive:
        fewshot = [Entry(info.filename, archive.read(info)) for info in archive.infolist()]
    return Lab(
        (folder / "open_clip_config.json").read_bytes(),
        (folder / "open_clip_model.safetensors").read_bytes(),
        fewshot,
    )


def test_weights_of_another_architecture_fail_the_job(service: Deployment, lab: Lab) -> None:
    """Valid safetensors of another configuration (wider embedding, narrower vision tower),
    submitted with the lab's config: the shapes only disagree once the model is built."""
    config = json.loads(lab.config)["model_cfg"]
    config["embed_dim"] *= 2
    config["vision_cfg"]["width"] //= 2
    other = open_clip.CLIP(**config)
    weights = save_tensors({k: v.contiguous() for k, v in other.state_dict().items()})
    response = service.submit(
        weights, lab.dataset(), model=None, model_config=lab.config, options=FAST_OPTIONS
    )
    error = assert_failed(service.run(response), "CHECKPOINT_ARCHITECTURE_MISMATCH")
    assert "shape mismatches" in error["detail"]


def _unreadable(canary: Path) -> dict[str, tuple[str, bytes]]:
    return {
        "decompression-bomb-png": ("zero/evil.png", bomb_png(100_000, 100_000)),
        "oversized-png": ("zero/evil.png", bomb_png(5_000, 5_000)),
        "truncated-jpeg": ("zero/evil.jpg", truncated_jpeg()),
        "empty-png": ("zero/evil.png", b""),
        "zip-named-png": ("zero/evil.png", zip_archive([Entry("a.png", b"x")])),
        "pickle-named-png": ("zero/evil.png", raw_pickle(payload("os.system", canary), 4)),
    }


@pytest.mark.parametrize(
    "case",
    [
        "decompression-bomb-png",
        "oversized-png",
        "truncated-jpeg",
        "empty-png",
        "zip-named-png",
        "pickle-named-png",
    ],
)
def test_an_unreadable_image_fails_the_job_naming_the_file(
    service: Deployment, lab: Lab, canary: Path, case: str
) -> None:
    """The API reads no pixels, so it accepts these; the worker refuses from the header on."""
    name, data = _unreadable(canary)[case]
    job = lab.submit(service, lab.dataset(Entry(name, data)))
    error = assert_failed(job, "DATASET_INVALID")
    assert repr(name) in error["detail"]
    assert job["stage"] in LOADING
    assert not canary.exists()


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P"])
def test_unusual_image_modes_work(service: Deployment, lab: Lab, mode: str) -> None:
    """The few shots re-encoded as CMYK JPEG, 16-bit grey PNG or palette PNG: a normal job,
    on the digits the images show (an image decoded as a blank one scores at chance).

    Another tenant then tries the finished job's artifacts: they do not exist for it.
    """
    entries = []
    for entry in lab.fewshot:
        if entry.name.endswith(".png"):
            suffix, data = convert_image(entry.data, mode)
            assert image_mode(data) == mode
            entries.append(Entry(entry.name.removesuffix(".png") + suffix, data))
        else:
            entries.append(entry)
    job = lab.submit(service, zip_archive(entries))
    assert job["state"] == "SUCCEEDED", job["error"]
    assert job["result"]["summary"]["ca_before"] >= MIN_CA
    artifacts = {a["name"]: a["url"] for a in job["result"]["artifacts"]}
    assert "report.json" in artifacts
    report = service.http.get(artifacts["report.json"], headers=service.auth())
    assert report.status_code == 200
    assert len(report.json()["data"]["classes"]) == 10
    other = service.auth(service.new_key("intruder"))
    for url in [f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/artifacts", *artifacts.values()]:
        response = service.http.get(url, headers=other)
        assert response.status_code == 404
        assert response.json()["code"] == "JOB_NOT_FOUND"


@pytest.mark.parametrize(
    ("names", "options"),
    [
        ({"zero": " ".join(["x"] * 40)}, {}),
        ({"zero": "\N{GREEK CAPITAL LETTER OMEGA}" * 80}, {}),
        ({}, {"tuning": {"steps": 20, "n_ctx": 30, "context_init": None}}),
    ],
    ids=["forty-words", "eighty-omegas", "long-learnt-context"],
)
def test_a_prompt_longer_than_the_text_context_fails_the_job(
    service: Deployment, lab: Lab, names: dict[str, str], options: dict[str, Any]
) -> None:
    """Display names of up to 80 characters pass the API, whose rule knows no tokenizer; the
    lab model's text context is 32 tokens, so these prompts cannot fit (eighty omegas are 159
    tokens, over the usual 77 too). The job must fail while loading, before any inversion or
    tuning time is spent, with a code that says so."""
    display = json.loads(next(e.data for e in lab.fewshot if e.name == "classes.json"))
    job = lab.submit(service, lab.dataset(names={**display, **names}), options=options)
    error = assert_failed(job, "PROMPT_TOO_LONG")
    assert "text context of 32 tokens" in error["detail"]
    assert job["stage"] in LOADING


def test_a_known_trigger_aimed_at_no_class_fails_the_job(service: Deployment, lab: Lab) -> None:
    """The spec is valid on its own; only the dataset shows its target is not one of its classes."""
    trigger = {"name": "badnets", "target": "no-such-class"}
    job = lab.submit(service, lab.dataset(), known_triggers=[trigger])
    error = assert_failed(job, "TRIGGER_INVALID")
    assert "no-such-class" in error["detail"]
