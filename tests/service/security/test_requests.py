"""Hostile requests: oversize, unsized and lying bodies, bad JSON, and options out of range.

Bodies are streamed into the blob store under a cap, so what matters besides the answer is what
is left behind: a refused or broken upload must leave no blob and no temp file. Lying
``Content-Length`` headers need a raw socket, since HTTP clients will not send them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service.security.conftest import UPLOAD_CAP, Deployment, assert_problem
from tests.service.security.payloads import bomb_png, class_images, safetensors_file, zip_archive

WEIGHTS = safetensors_file()
DATASET = zip_archive(class_images())


def _blobs(deployment: Deployment) -> set[str]:
    return {p.name for p in (deployment.blobs / "sha256").rglob("*") if p.is_file()}


def _exchange(url: str, request: bytes, *, hang_up: bool = False) -> bytes:
    """Sends raw bytes and returns the first response, or what came before the server closed.

    With ``hang_up`` the client half-closes right after sending, as a client that went away
    does; the server may then drop its answer, which is its right.
    """
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        if hang_up:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while not _complete(received) and (chunk := sock.recv(65536)):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def _complete(raw: bytes) -> bool:
    head, found, rest = raw.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value)
    return True


def _first_response(raw: bytes) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of the first HTTP response in ``raw``."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(next(v for k, v in headers.items() if k.lower() == "content-length"))
    body: dict[str, Any] = json.loads(rest[:length])
    return status, body


def _put_head(deployment: Deployment, length: int) -> bytes:
    return (
        f"PUT /v1/files HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {deployment.key}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


# The upload cap -----------------------------------------------------------------------------------


def test_an_upload_at_the_cap_is_kept_and_one_byte_more_is_413(capped: Deployment) -> None:
    at_cap = b"a" * UPLOAD_CAP
    accepted = capped.put(at_cap)
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["size"] == UPLOAD_CAP
    before = _blobs(capped)
    assert_problem(capped.put(b"b" * (UPLOAD_CAP + 1)), 413, "UPLOAD_TOO_LARGE")
    assert _blobs(capped) == before


def test_an_unsized_upload_over_the_cap_is_413(capped: Deployment) -> None:
    """Without Content-Length the cap must hold on the bytes counted as they stream in."""

    def chunks() -> Iterator[bytes]:
        for _ in range(UPLOAD_CAP // 1024 + 8):
            yield b"c" * 1024

    before = _blobs(capped)
    response = capped.http.put("/v1/files", content=chunks(), headers=capped.auth())
    assert_problem(response, 413, "UPLOAD_TOO_LARGE")
    assert _blobs(capped) == before


def test_an_unsized_upload_under_the_cap_works(capped: Deployment) -> None:
    body = b"chunked body " * 1000

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    response = capped.http.put("/v1/files", content=chunks(), headers=capped.auth())
    assert response.status_code == 201, response.text
    assert response.json()["sha256"] == hashlib.sha256(body).hexdigest()
    assert response.json()["size"] == len(body)


def test_a_one_shot_submission_over_the_cap_is_413(capped: Deployment) -> None:
    before = _blobs(capped)
    response = capped.http.post(
        "/v1/jobs",
        headers=capped.auth(),
        files={
            "checkpoint": ("w.safetensors", WEIGHTS, "application/octet-stream"),
            "dataset": ("d.zip", b"d" * (UPLOAD_CAP + 1), "application/zip"),
            "request": (None, json.dumps({"model": "ViT-B-32"}), "application/json"),
        },
    )
    assert_problem(response, 413, "UPLOAD_TOO_LARGE")
    assert _blobs(capped) == before  # the checkpoint part before it is not kept either


def test_a_huge_declared_length_is_refused_before_any_body(capped: Deployment) -> None:
    """The server answers from the headers; the client never has to send the terabyte."""
    raw = _exchange(capped.url, _put_head(capped, 10**12))
    status, body = _first_response(raw)
    assert status == 413
    assert body["code"] == "UPLOAD_TOO_LARGE"


# Lying and missing Content-Length ---------------------------------------------------------------


def test_a_body_shorter_than_its_content_length_leaves_nothing(service: Deployment) -> None:
    """The client declares 1,000 bytes, sends 10 and goes away."""
    sent = b"0123456789"
    raw = _exchange(service.url, _put_head(service, 1000) + sent, hang_up=True)
    if raw:  # the answer may not make it to a client that has gone
        status, body = _first_response(raw)
        assert status == 400
        assert body["code"] == "UPLOAD_INCOMPLETE"
    service.assert_idle()
    assert hashlib.sha256(sent).hexdigest() not in _blobs(service)


def test_a_body_longer_than_its_content_length_is_cut_at_it(service: Deployment) -> None:
    """The declared length wins: the rest is a malformed next request on the connection."""
    raw = _exchange(service.url, _put_head(service, 5) + b"0123456789")
    status, body = _first_response(raw)
    assert status == 201
    assert body["size"] == 5
    assert body["sha256"] == hashlib.sha256(b"01234").hexdigest()
    assert hashlib.sha256(b"0123456789").hexdigest() not in _blobs(service)


def test_a_one_shot_submission_cut_short_leaves_nothing(service: Deployment) -> None:
    boundary = "xXx-boundary"
    part = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=checkpoint; filename=w\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + WEIGHTS[:100]
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {service.key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(part) + 100_000}\r\n\r\n"
    ).encode()
    raw = _exchange(service.url, head + part, hang_up=True)
    if raw:
        status, body = _first_response(raw)
        assert status == 400
        assert body["code"] == "MULTIPART_INVALID"
    service.assert_idle()
    assert hashlib.sha256(WEIGHTS[:100]).hexdigest() not in _blobs(service)


def test_a_bad_content_length_is_refused(service: Deployment) -> None:
    raw = _exchange(service.url, _put_head(service, 5).replace(b": 5\r", b": -5\r") + b"12345")
    assert raw.startswith(b"HTTP/1.1 400")


# JSON bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"[]",
        b"null",
        b'"checkpoint_file"',
        b'{"checkpoint_file": 1, "dataset_file": []}',
        b'{"checkpoint_file": "f", "dataset_file": "f", "options": ' + b"[" * 50_000 + b"}",
        b"\xff\xfe{\x00}\x00",
        b'{"checkpoint_file": "' + b"f" * 100 + b'", "dataset_file": "f"}',
        b'{"checkpoint_file": "f", "dataset_file": "f", "known_triggers": '
        + json.dumps([{"name": "badnets"}] * 17).encode()
        + b"}",
    ],
    ids=[
        "unterminated",
        "array",
        "null",
        "string",
        "wrong-types",
        "deeply-nested",
        "utf-16",
        "overlong-id",
        "seventeen-triggers",
    ],
)
def test_a_bad_json_request_is_refused(service: Deployment, raw: bytes) -> None:
    headers = {**service.auth(), "Content-Type": "application/json"}
    assert_problem(
        service.http.post("/v1/jobs", content=raw, headers=headers), 422, "REQUEST_INVALID"
    )


def test_a_json_request_over_a_mebibyte_is_413(service: Deployment) -> None:
    raw = json.dumps({"checkpoint_file": "f", "dataset_file": "f", "pad": "x" * 2 * 1024**2})
    headers = {**service.auth(), "Content-Type": "application/json"}
    response = service.http.post("/v1/jobs", content=raw.encode(), headers=headers)
    assert_problem(response, 413, "REQUEST_TOO_LARGE")


def test_a_bad_json_request_part_is_refused(service: Deployment) -> None:
    response = service.http.post(
        "/v1/jobs",
        headers=service.auth(),
        files={
            "checkpoint": ("w.safetensors", WEIGHTS, "application/octet-stream"),
            "dataset": ("d.zip", DATASET, "application/zip"),
            "request": (None, b'{"model": "ViT-B-32",', "application/json"),
        },
    )
    assert_problem(response, 422, "REQUEST_INVALID")


@pytest.mark.parametrize(
    "config",
    [b"{not json", b"[1, 2]", b"\xff\xfe", b'"model"', b'{"a": ' + b"[" * 100_000],
    ids=["broken", "array", "binary", "string", "deeply-nested"],
)
def test_a_bad_model_config_file_is_refused(service: Deployment, config: bytes) -> None:
    response = service.submit(WEIGHTS, DATASET, model=None, model_config=config)
    assert_problem(response, 422, "MODEL_CONFIG_INVALID")


# Unknown fields, options and attack specs --------------------------------------------------------


def _job(service: Deployment, **fields: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "checkpoint_file": service.upload(WEIGHTS),
        "dataset_file": service.upload(DATASET),
        "model": "ViT-B-32",
        **fields,
    }
    return service.create(body)


@pytest.mark.parametrize(
    "fields",
    [{"unknown": 1}, {"callback_url": "http://169.254.169.254/"}, {"model": "x" * 200}],
    ids=["unknown-field", "unknown-callback", "overlong-model"],
)
def test_unknown_or_overlong_request_fields_are_refused(
    service: Deployment, fields: dict[str, Any]
) -> None:
    assert_problem(_job(service, **fields), 422, "REQUEST_INVALID")


def test_an_unknown_model_name_is_refused(service: Deployment) -> None:
    assert_problem(_job(service, model="../../etc/passwd"), 422, "MODEL_UNKNOWN")


@pytest.mark.parametrize(
    "options",
    [
        {"no_such_option": 1},
        {"inversion": {"no_such_option": 1}},
        {"seed": -1},
        {"seed": 2**31},
        {"seed": 10**100},
        {"rounds": -1},
        {"rounds": 11},
        {"inversion": {"steps": 10**9}},
        {"inversion": {"steps": 0}},
        {"inversion": {"batch_size": 10**6}},
        {"inversion": {"lr": -0.1}},
        {"tuning": {"steps": -5}},
        {"tuning": {"n_ctx": 10**4}},
        {"tuning": {"context_init": "x" * 201}},
        {"tuning": {"n_ctx": 2}},
        {"tuning": {"context_init": "a b c d e"}},
        {"tuning": {"context_init": ""}},
        {"holdout_fraction": 1.5},
        {"holdout_fraction": 0},
        {"mask_budget": 1e308},
        {"device": "cuda; rm -rf /"},
        {"device": "cuda"},  # where a job runs is the operator's setting, not the tenant's
        {"precision": "bf16"},
        {"rounds": {"count": 11}},
        {"rounds": {"mask_budget": 1e308}},
        {"evaluation": {"holdout_fraction": 1.5}},
        {"round_steps": 5, "rounds": {"steps": 5}},  # an old flat name and its group at once
        {"rounds": True},
        {"verdict": {"min_flip_rate": 2}},
        {"templates": []},
        {"templates": ["no placeholder"]},
        {"templates": ["{} and {}"]},
        {"templates": ["{}" + "x" * 300]},
    ],
    ids=lambda options: json.dumps(options)[:40],
)
def test_options_out_of_range_are_refused(service: Deployment, options: dict[str, Any]) -> None:
    assert_problem(_job(service, options=options), 422, "OPTIONS_INVALID")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_refused(service: Deployment, literal: bytes) -> None:
    """The request parser reads these literals as floats, so the option's own bounds must
    refuse them (NaN compares false with every bound, infinity passes a lower one)."""
    raw = json.dumps(
        {
            "checkpoint_file": service.upload(WEIGHTS),
            "dataset_file": service.upload(DATASET),
            "model": "ViT-B-32",
            "options": {"holdout_fraction": "HERE"},
        }
    ).encode()
    headers = {**service.auth(), "Content-Type": "application/json"}
    response = service.http.post(
        "/v1/jobs", content=raw.replace(b'"HERE"', literal), headers=headers
    )
    assert_problem(response, 422, "OPTIONS_INVALID")


def _png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "no-such-attack"},
        {"name": "badnets; import os"},
        {},
        {"name": "badnets", "size": -1},
        {"name": "badnets", "cells": 10**9},
        {"name": "badnets", "exec": "print(1)"},
        {"name": "badnets", "pattern_png": "not base64!"},
        {"name": "badnets", "pattern_png": _png_b64(bomb_png())},
        {"name": "badnets", "pattern_png": _png_b64(b"GIF89a" + bytes(20))},
        {"name": "blended", "image_png": _png_b64(bomb_png(20_000, 20_000))},
        {"name": "wanet", "s": float("1e308")},
    ],
    ids=[
        "unknown-name",
        "injected-name",
        "no-name",
        "negative-size",
        "huge-grid",
        "extra-field",
        "bad-base64",
        "bomb-pattern",
        "not-a-png",
        "bomb-blend-image",
        "huge-warp",
    ],
)
def test_unknown_or_hostile_attack_specs_are_refused(
    service: Deployment, spec: dict[str, Any]
) -> None:
    assert_problem(_job(service, known_triggers=[spec]), 422, "TRIGGER_INVALID")
