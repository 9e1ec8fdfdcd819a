"""Hostile archives, as the dataset and as a hub checkpoint, and hostile dataset layouts.

Archives are vetted from their directory before a byte is extracted, so every case here must be
refused at submission, and quickly however many members the upload packs: an archive that makes
the API think for a minute is an outage, so the largest cases are timed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

import pytest

from tests.service.security.conftest import Deployment, assert_problem
from tests.service.security.payloads import (
    Entry,
    class_images,
    hub_entries,
    many_classes_zip,
    many_members_tar_gz,
    many_members_zip,
    png,
    safetensors_file,
    tar_archive,
    zip_archive,
    zip_bomb,
)

WEIGHTS = safetensors_file()
DATASET = zip_archive(class_images())
QUICK_S = 5.0
"""How long the API may take to refuse an archive, measured from the job request alone."""


AIM = {
    "dataset": {"dir": "cat/", "leaf": "x.png"},
    "checkpoint": {"dir": "", "leaf": "open_clip_model.safetensors"},
}
"""What a hostile member's name aims at: an image in a class folder, or the hub's weights."""


@dataclass(frozen=True)
class Hostile:
    """One hostile member, its name a template (``{dir}``, ``{leaf}``) aimed per role by AIM,
    so that in a hub archive a link or device stands where the weights file should be."""

    format: str  # zip | tar
    entry: Entry

    def member(self, role: str) -> Entry:
        return replace(self.entry, name=self.entry.name.format(**AIM[role]))

    def archive(self, role: str) -> bytes:
        """The hostile member among a valid dataset's images or a valid hub's files."""
        hostile = self.member(role)
        if role == "dataset":
            entries = [*class_images(), hostile]
        else:
            config, weights = hub_entries()
            entries = (
                [config, hostile] if hostile.name == weights.name else [config, weights, hostile]
            )
        return zip_archive(entries) if self.format == "zip" else tar_archive(entries)


HOSTILE = {
    "zip-slip": Hostile("zip", Entry("../{leaf}", png())),
    "zip-slip-from-a-folder": Hostile("zip", Entry("{dir}../../{leaf}", png())),
    "zip-absolute-path": Hostile("zip", Entry("/etc/{leaf}", png())),
    "zip-backslash-slip": Hostile("zip", Entry("..\\{leaf}", png())),
    "zip-drive-letter": Hostile("zip", Entry("C:/{leaf}", png())),
    "zip-symlink": Hostile("zip", Entry("{dir}{leaf}", kind="symlink", target="/etc/passwd")),
    "tar-slip": Hostile("tar", Entry("../{leaf}", png())),
    "tar-absolute-path": Hostile("tar", Entry("/etc/{leaf}", png())),
    "tar-symlink": Hostile("tar", Entry("{dir}{leaf}", kind="symlink", target="/etc/passwd")),
    "tar-symlink-up": Hostile("tar", Entry("{dir}{leaf}", kind="symlink", target="../../x")),
    "tar-hardlink": Hostile("tar", Entry("{dir}{leaf}", kind="hardlink", target="/etc/passwd")),
    "tar-char-device": Hostile("tar", Entry("{dir}{leaf}", kind="chr")),
    "tar-block-device": Hostile("tar", Entry("{dir}{leaf}", kind="blk")),
    "tar-fifo": Hostile("tar", Entry("{dir}{leaf}", kind="fifo")),
}


@pytest.mark.parametrize("case", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_member_in_a_dataset_is_refused(service: Deployment, case: Hostile) -> None:
    response = service.submit(WEIGHTS, case.archive("dataset"))
    problem = assert_problem(response, 422, "DATASET_UNSAFE")
    assert repr(case.member("dataset").name) in problem["detail"]


@pytest.mark.parametrize("case", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_member_in_a_hub_checkpoint_is_refused(
    service: Deployment, case: Hostile
) -> None:
    response = service.submit(case.archive("checkpoint"), DATASET, model=None)
    problem = assert_problem(response, 422, "CHECKPOINT_FORMAT_UNSUPPORTED")
    assert repr(case.member("checkpoint").name) in problem["detail"]


@pytest.mark.parametrize("role", ["dataset", "checkpoint"])
def test_a_zip_bomb_is_refused_from_its_directory(service: Deployment, role: str) -> None:
    """50 MB of zeros deflates to about 50 kB: the ratio gives it away before inflating."""
    bomb = zip_bomb()
    assert len(bomb) < 1024**2
    if role == "dataset":
        response = service.submit(WEIGHTS, bomb)
        code = "DATASET_UNSAFE"
    else:
        config, weights = hub_entries()
        hub = zip_archive([config, weights, Entry("README.md", bytes(50 * 1024**2))], deflate=True)
        response = service.submit(hub, DATASET, model=None)
        code = "CHECKPOINT_FORMAT_UNSUPPORTED"
    assert "expands" in assert_problem(response, 422, code)["detail"]


@pytest.mark.parametrize(
    ("role", "declare"),
    [("dataset", None), ("checkpoint", None), ("dataset", 1), ("checkpoint", 1)],
    ids=["dataset", "checkpoint", "dataset-declaring-one", "checkpoint-declaring-one"],
)
def test_two_hundred_thousand_members_are_refused_quickly(
    service: Deployment, role: str, declare: int | None
) -> None:
    """Timed from the job request alone: the uploads are the client's cost, the check ours.

    The end record may also claim a single member while the directory holds them all.
    """
    many = many_members_zip(declare=declare)
    if role == "dataset":
        body = {"checkpoint_file": service.upload(WEIGHTS), "dataset_file": service.upload(many)}
        code = "DATASET_UNSAFE"
    else:
        body = {"checkpoint_file": service.upload(many), "dataset_file": service.upload(DATASET)}
        code = "CHECKPOINT_FORMAT_UNSUPPORTED"
    started = time.monotonic()
    response = service.create({**body, "model": "ViT-B-32"})
    took = time.monotonic() - started
    assert "more than 100000 members" in assert_problem(response, 422, code)["detail"]
    assert took < QUICK_S


def test_a_tar_of_three_hundred_thousand_members_is_refused_quickly(service: Deployment) -> None:
    """As a hub checkpoint (at most 64 members): the scan must stop at the limit, not read
    every header the upload holds."""
    many = many_members_tar_gz()
    body = {"checkpoint_file": service.upload(many), "dataset_file": service.upload(DATASET)}
    started = time.monotonic()
    response = service.create(body)
    took = time.monotonic() - started
    problem = assert_problem(response, 422, "CHECKPOINT_FORMAT_UNSUPPORTED")
    assert "more than 64 members" in problem["detail"]
    assert took < QUICK_S


def test_a_tar_gz_bomb_is_refused(service: Deployment) -> None:
    """Tar has no compressed sizes to compare, so the member size limit must catch it."""
    entries = [*class_images(), Entry("cat/bomb.png", bytes(80 * 1024**2))]
    bomb = tar_archive(entries, compression="gz")
    assert len(bomb) < 1024**2
    started = time.monotonic()
    response = service.submit(WEIGHTS, bomb)
    assert time.monotonic() - started < QUICK_S
    assert "'cat/bomb.png'" in assert_problem(response, 422, "DATASET_UNSAFE")["detail"]


@pytest.mark.parametrize(
    ("entries", "code"),
    [
        ([*class_images(), Entry("cat/more.zip", DATASET)], "DATASET_NOT_IMAGE"),
        ([*class_images(), Entry("cat/more.tar.gz", b"\x1f\x8b")], "DATASET_NOT_IMAGE"),
        ([*class_images(), Entry("cat/notes.txt", b"hello")], "DATASET_NOT_IMAGE"),
        ([*class_images(), Entry("cat/run.sh", b"#!/bin/sh\n")], "DATASET_NOT_IMAGE"),
        ([*class_images(), Entry("cat/weights.pkl", b"\x80\x04.")], "DATASET_NOT_IMAGE"),
        ([*class_images(), Entry("cat/0.png", png())], "DATASET_UNSAFE"),
        ([*class_images(), Entry("cat/deep/x.png", png())], "DATASET_LAYOUT"),
        ([Entry("all/" + e.name, e.data) for e in class_images()], "DATASET_LAYOUT"),
    ],
    ids=[
        "nested-zip",
        "nested-tar-gz",
        "text-file",
        "shell-script",
        "pickle-file",
        "duplicate-member",
        "subfolder",
        "wrapper-folder",
    ],
)
def test_a_dataset_with_what_is_not_an_image_is_refused(
    service: Deployment, entries: list[Entry], code: str
) -> None:
    assert_problem(service.submit(WEIGHTS, zip_archive(entries)), 422, code)


def test_a_hub_archive_inside_an_archive_is_refused(service: Deployment) -> None:
    """Nested archives are never opened: the outer one has no config where the worker looks."""
    inner = zip_archive(hub_entries())
    outer = zip_archive([Entry("model/hub.zip", inner)])
    response = service.submit(outer, DATASET, model=None)
    assert_problem(response, 422, "CHECKPOINT_FORMAT_UNSUPPORTED")


def test_one_class_is_refused(service: Deployment) -> None:
    response = service.submit(WEIGHTS, zip_archive(class_images(("cat",))))
    assert_problem(response, 422, "DATASET_TOO_FEW_CLASSES")


def test_ten_thousand_classes_are_refused(service: Deployment) -> None:
    started = time.monotonic()
    response = service.submit(WEIGHTS, many_classes_zip())
    assert time.monotonic() - started < 3 * QUICK_S  # two uploads and the check
    assert "10000" in assert_problem(response, 422, "DATASET_TOO_MANY_CLASSES")["detail"]


@pytest.mark.parametrize(
    ("folder", "display", "code"),
    [
        ("ca\x07t", None, "DATASET_CLASS_NAME"),
        ("ca\nt", None, "DATASET_CLASS_NAME"),
        ("ca\x1b[2Jt", None, "DATASET_CLASS_NAME"),
        ("c" * 81, None, "DATASET_CLASS_NAME"),
        ("cat", "c\x00at", "DATASET_CLASSES_JSON"),
        ("cat", "cat\r\nX-Injected: 1", "DATASET_CLASSES_JSON"),
        ("cat", "\x1b[31mred", "DATASET_CLASSES_JSON"),
        ("cat", "   ", "DATASET_CLASSES_JSON"),
        ("cat", "dog", "DATASET_CLASSES_JSON"),
    ],
    ids=[
        "bell-in-folder",
        "newline-in-folder",
        "escape-in-folder",
        "long-folder",
        "nul-in-display-name",
        "crlf-in-display-name",
        "escape-in-display-name",
        "blank-display-name",
        "display-name-of-another-class",
    ],
)
def test_class_names_with_control_characters_are_refused(
    service: Deployment, folder: str, display: str | None, code: str
) -> None:
    entries = class_images((folder, "dog"))
    if display is not None:
        entries.append(Entry("classes.json", json.dumps({folder: display}).encode()))
    problem = assert_problem(service.submit(WEIGHTS, zip_archive(entries)), 422, code)
    assert "\x1b" not in problem["detail"]


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000, b'{"cat": "cat", "cat": "dog"}', b"\xff\xfe{}", b'["cat"]'],
    ids=["deeply-nested", "repeated-key", "not-utf8", "not-an-object"],
)
def test_a_hostile_classes_json_is_refused(service: Deployment, raw: bytes) -> None:
    entries = [*class_images(), Entry("classes.json", raw)]
    assert_problem(service.submit(WEIGHTS, zip_archive(entries)), 422, "DATASET_CLASSES_JSON")
