"""The HTTP contract (README, "API at a glance"), in process, on the embedded database."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.numpy import save

from service.api import create_app
from service.auth import revoke_key
from service.db import session_factory, transaction
from service.settings import Settings
from tests.service.support import embedded_settings, new_key

PROBLEM = "application/problem+json"


def weights() -> bytes:
    return save({"w": np.zeros((2, 2), dtype=np.float32)})


def dataset(classes: dict[str, int] | None = None, *, names: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for folder, count in (classes or {"cat": 3, "dog": 3}).items():
            for index in range(count):
                image = io.BytesIO()
                Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(image, "PNG")
                archive.writestr(f"{folder}/{index}.png", image.getvalue())
        if names is not None:
            archive.writestr("classes.json", json.dumps(names))
    return buffer.getvalue()


def upload(api: TestClient, body: bytes) -> str:
    response = api.put("/v1/files", content=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def job_body(api: TestClient, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "checkpoint_file": upload(api, weights()),
        "dataset_file": upload(api, dataset()),
        "model": "ViT-B-32",
    }
    body.update(overrides)
    return body


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    problem: dict[str, Any] = response.json()
    assert problem["code"] == code
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    assert problem["type"].endswith(code.lower().replace("_", "-"))
    return problem


# Files ------------------------------------------------------------------------------------------


def test_upload_is_content_addressed_and_idempotent(api: TestClient, settings: Settings) -> None:
    first = api.put("/v1/files", content=b"hello weights")
    second = api.put("/v1/files", content=b"hello weights")
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    body = first.json()
    assert body["size"] == 13
    blob = settings.blobs / "sha256" / body["sha256"][:2] / body["sha256"][2:4] / body["sha256"]
    assert blob.read_bytes() == b"hello weights"


def test_an_oversize_upload_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path / "var", max_upload_bytes=1000)
    with TestClient(create_app(settings, reaper=False)) as api:
        api.headers["Authorization"] = f"Bearer {new_key(settings, 'acme')}"
        declared = api.put("/v1/files", content=b"x" * 1001)
        assert_problem(declared, 413, "UPLOAD_TOO_LARGE")

        def chunks() -> Any:  # no Content-Length: the cap must hold on the bytes counted
            for _ in range(20):
                yield b"y" * 100

        streamed = api.put("/v1/files", content=chunks())
        assert_problem(streamed, 413, "UPLOAD_TOO_LARGE")
    assert list((settings.blobs / "tmp").iterdir()) == []
    assert not (settings.blobs / "sha256").exists()


def test_an_empty_upload_is_refused(api: TestClient) -> None:
    assert_problem(api.put("/v1/files", content=b""), 400, "UPLOAD_EMPTY")


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "UNAUTHENTICATED"),
        ("Bearer ak_nope", "INVALID_API_KEY"),
        ("Basic x", "UNAUTHENTICATED"),
    ],
)
def test_requests_need_a_valid_key(api: TestClient, header: str | None, code: str) -> None:
    del api.headers["Authorization"]
    headers = {"Authorization": header} if header else {}
    response = api.put("/v1/files", content=b"abc", headers=headers)
    problem = assert_problem(response, 401, code)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert problem["request_id"] == response.headers["x-request-id"]
    assert_problem(api.get("/v1/jobs", headers=headers), 401, code)


def test_a_revoked_key_stops_working(api: TestClient, settings: Settings) -> None:
    assert api.get("/v1/jobs").status_code == 200
    factory = session_factory(settings.database)
    with transaction(factory) as session:
        from service.models import ApiKey

        (key,) = session.query(ApiKey).all()
        assert revoke_key(session, key.id)
    assert_problem(api.get("/v1/jobs"), 401, "INVALID_API_KEY")


# Jobs -------------------------------------------------------------------------------------------


def test_create_answers_202_with_the_job_resource(api: TestClient) -> None:
    response = api.post("/v1/jobs", json=job_body(api, options={"seed": 3}))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert int(response.headers["retry-after"]) > 0
    assert job["state"] == "PENDING"
    assert job["done"] is False
    assert job["result"] is None
    assert job["error"] is None
    assert job["attempt"] == 0
    assert job["request"]["options"] == {"seed": 3}
    fetched = api.get(f"/v1/jobs/{job['id']}")
    assert fetched.status_code == 200
    assert fetched.json()["id"] == job["id"]
    assert "retry-after" in fetched.headers


def test_one_shot_multipart_submission(api: TestClient) -> None:
    request = {"model": "ViT-B-32", "options": {"seed": 1}}
    response = api.post(
        "/v1/jobs",
        files={
            "checkpoint": ("w.safetensors", weights(), "application/octet-stream"),
            "dataset": ("d.zip", dataset(), "application/zip"),
            "request": (None, json.dumps(request), "application/json"),
        },
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["request"]["model"] == "ViT-B-32"
    assert job["request"]["checkpoint_file"] == upload(api, weights())  # same bytes, same id


def test_multipart_without_the_dataset_is_refused(api: TestClient) -> None:
    response = api.post("/v1/jobs", files={"checkpoint": ("w", weights(), "x/y")})
    assert_problem(response, 400, "MULTIPART_INVALID")


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"checkpoint_file": "file_missing"}, 404, "FILE_NOT_FOUND"),
        ({"model": "No-Such-Model"}, 422, "MODEL_UNKNOWN"),
        ({"model": None}, 422, "MODEL_REQUIRED"),
        ({"options": {"seed": -1}}, 422, "OPTIONS_INVALID"),
        ({"options": {"inversion": {"steps": 10**9}}}, 422, "OPTIONS_INVALID"),
        ({"options": {"no_such_option": 1}}, 422, "OPTIONS_INVALID"),
        ({"known_triggers": [{"name": "no-such-attack"}]}, 422, "TRIGGER_INVALID"),
        ({"unknown_field": 1}, 422, "REQUEST_INVALID"),
    ],
)
def test_bad_requests_get_a_problem_before_any_job_exists(
    api: TestClient, change: dict[str, Any], status: int, code: str
) -> None:
    response = api.post("/v1/jobs", json=job_body(api, **change))
    assert_problem(response, status, code)
    assert api.get("/v1/jobs").json()["jobs"] == []


@pytest.mark.parametrize(
    ("checkpoint", "data", "code"),
    [
        (b"", None, "UPLOAD_EMPTY"),
        (b"\x80\x04not really", None, None),  # a pickle: sniffed, left for the worker
        (b"garbage bytes here", None, "CHECKPOINT_FORMAT_UNSUPPORTED"),
        (None, dataset({"cat": 3}), "DATASET_TOO_FEW_CLASSES"),
        (None, dataset({"cat": 3, "dog": 1}), "DATASET_CLASS_TOO_SMALL"),
        (None, b"not an archive", "DATASET_NOT_ARCHIVE"),
    ],
)
def test_inputs_are_checked_before_the_202(
    api: TestClient, checkpoint: bytes | None, data: bytes | None, code: str | None
) -> None:
    if checkpoint == b"":
        assert_problem(api.put("/v1/files", content=checkpoint), 400, "UPLOAD_EMPTY")
        return
    changes = {}
    if checkpoint is not None:
        changes["checkpoint_file"] = upload(api, checkpoint)
    if data is not None:
        changes["dataset_file"] = upload(api, data)
    response = api.post("/v1/jobs", json=job_body(api, **changes))
    if code is None:
        assert response.status_code == 202, response.text
    else:
        assert_problem(response, 422, code)


def test_torchscript_is_refused_at_submission(api: TestClient) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/code/__torch__/model.py", "def forward(self): ...")
        archive.writestr("model/constants.pkl", b"\x80\x02.")
        archive.writestr("model/data.pkl", b"\x80\x02.")
    body = job_body(api, checkpoint_file=upload(api, buffer.getvalue()))
    assert_problem(api.post("/v1/jobs", json=body), 422, "CHECKPOINT_TORCHSCRIPT")


def test_idempotency_key_replays_and_refuses_another_body(api: TestClient) -> None:
    body = job_body(api)
    headers = {"Idempotency-Key": "pipeline-run-42"}
    first = api.post("/v1/jobs", json=body, headers=headers)
    again = api.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    other = api.post("/v1/jobs", json={**body, "options": {"seed": 9}}, headers=headers)
    assert_problem(other, 422, "IDEMPOTENCY_KEY_REUSED")
    assert len(api.get("/v1/jobs").json()["jobs"]) == 1
    fresh = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": '"another"'})
    assert fresh.json()["id"] != first.json()["id"]


def test_a_tenant_at_its_active_job_limit_gets_429(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path / "var", max_active_jobs=2)
    with TestClient(create_app(settings, reaper=False)) as api:
        api.headers["Authorization"] = f"Bearer {new_key(settings, 'acme')}"
        body = job_body(api)
        first = api.post("/v1/jobs", json=body).json()
        assert api.post("/v1/jobs", json=body).status_code == 202
        refused = api.post("/v1/jobs", json=body)
        assert_problem(refused, 429, "TOO_MANY_ACTIVE_JOBS")
        assert refused.headers["retry-after"] == "60"
        other = {"Authorization": f"Bearer {new_key(settings, 'globex')}"}
        theirs = {
            "checkpoint_file": api.put("/v1/files", content=weights(), headers=other).json()["id"],
            "dataset_file": api.put("/v1/files", content=dataset(), headers=other).json()["id"],
            "model": "ViT-B-32",
        }
        assert api.post("/v1/jobs", json=theirs, headers=other).status_code == 202  # own quota
        api.post(f"/v1/jobs/{first['id']}/cancel")  # a finished job frees its place
        assert api.post("/v1/jobs", json=body).status_code == 202


def test_pagination_walks_every_job_once_newest_first(api: TestClient) -> None:
    body = job_body(api)
    created = [api.post("/v1/jobs", json=body).json()["id"] for _ in range(5)]
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        params: dict[str, Any] = {"page_size": 2}
        if token:
            params["page_token"] = token
        page = api.get("/v1/jobs", params=params).json()
        seen += [job["id"] for job in page["jobs"]]
        pages += 1
        token = page["next_page_token"]
        if token is None:
            break
    assert pages == 3
    assert seen == created[::-1]
    assert api.get("/v1/jobs", params={"state": "SUCCEEDED"}).json()["jobs"] == []
    assert len(api.get("/v1/jobs", params={"state": "PENDING"}).json()["jobs"]) == 5


def test_page_tokens_are_opaque_and_checked(api: TestClient) -> None:
    body = job_body(api)
    for _ in range(3):
        api.post("/v1/jobs", json=body)
    token = api.get("/v1/jobs", params={"page_size": 1}).json()["next_page_token"]
    assert token
    tampered = ("A" if token[0] != "A" else "B") + token[1:]
    assert_problem(api.get("/v1/jobs", params={"page_token": tampered}), 400, "PAGE_TOKEN_INVALID")
    other_filter = {"page_token": token, "state": "FAILED"}
    assert_problem(api.get("/v1/jobs", params=other_filter), 400, "PAGE_TOKEN_INVALID")
    assert_problem(api.get("/v1/jobs", params={"page_size": -1}), 422, "REQUEST_INVALID")
    non_ascii = {"page_token": token.partition(".")[0] + ".\u00e9"}
    assert_problem(api.get("/v1/jobs", params=non_ascii), 400, "PAGE_TOKEN_INVALID")


def test_tenants_see_only_their_own_things(api: TestClient, settings: Settings) -> None:
    body = job_body(api)
    job = api.post("/v1/jobs", json=body).json()
    other = {"Authorization": f"Bearer {new_key(settings, 'globex')}"}
    assert_problem(api.get(f"/v1/jobs/{job['id']}", headers=other), 404, "JOB_NOT_FOUND")
    assert_problem(api.post(f"/v1/jobs/{job['id']}/cancel", headers=other), 404, "JOB_NOT_FOUND")
    listing = api.get(f"/v1/jobs/{job['id']}/artifacts", headers=other)
    assert_problem(listing, 404, "JOB_NOT_FOUND")
    assert api.get("/v1/jobs", headers=other).json()["jobs"] == []
    stolen = api.post("/v1/jobs", json=body, headers=other)  # acme's file ids
    assert_problem(stolen, 404, "FILE_NOT_FOUND")


def test_cancel_of_a_queued_job_ends_it_and_a_second_cancel_is_harmless(api: TestClient) -> None:
    job = api.post("/v1/jobs", json=job_body(api)).json()
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 202
    body = cancelled.json()
    assert body["state"] == "CANCELLED"
    assert body["done"] is True
    assert body["result"] is None
    assert body["error"]["code"] == "CANCELLED"
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202


def test_unknown_routes_and_methods_are_problems_too(api: TestClient) -> None:
    assert_problem(api.get("/v1/nothing"), 404, "NOT_FOUND")
    assert_problem(api.delete("/v1/files"), 405, "METHOD_NOT_ALLOWED")
    assert_problem(api.post("/v1/jobs", content=b"x"), 415, "UNSUPPORTED_MEDIA_TYPE")
    bad_json = api.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"})
    assert_problem(bad_json, 422, "REQUEST_INVALID")


# Probes -----------------------------------------------------------------------------------------


def test_probes_and_metrics(api: TestClient) -> None:
    assert api.get("/livez").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert set(ready.json()["checks"]) == {"database", "broker", "disk"}
    api.post("/v1/jobs", json=job_body(api))
    metrics = api.get("/metrics").text
    assert 'antidote_jobs{state="PENDING"} 1.0' in metrics
    assert "antidote_upload_bytes_total" in metrics
    assert "antidote_job_queue_wait_seconds_bucket" in metrics
    assert 'antidote_http_requests_total{method="POST",route="/v1/jobs",status="202"}' in metrics


def test_readyz_reports_each_dependency_that_is_down(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "var", database_url="postgresql://nobody@127.0.0.1:9/none"
    )
    with TestClient(create_app(settings, reaper=False)) as api:
        assert api.get("/livez").status_code == 200  # liveness depends on nothing
        (settings.broker_folder / "queue").rmdir()
        response = api.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"]["ok"] is False
    assert checks["broker"]["ok"] is False
    assert checks["disk"]["ok"] is True


def test_the_openapi_document_describes_both_submission_forms(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    create = spec["paths"]["/v1/jobs"]["post"]
    assert set(create["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert "/v1/jobs/{job_id}/artifacts/{name}" in spec["paths"]
