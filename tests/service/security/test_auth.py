"""Authentication and tenant isolation: no key, a bad key, a revoked key, another tenant's ids.

Another tenant's job, file or artifact must be indistinguishable from one that does not exist
(404 with the same code), so ids cannot be probed; and an unauthenticated upload must cost the
service nothing, which the blob store shows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import httpx
import pytest

from tests.service.security.conftest import Deployment, assert_failed, assert_problem
from tests.service.security.payloads import (
    TINY_MODEL_CFG,
    class_images,
    safetensors_file,
    zip_archive,
)

WEIGHTS = safetensors_file()
DATASET = zip_archive(class_images())

Call = Callable[[Deployment, dict[str, str]], httpx.Response]

CALLS: dict[str, Call] = {
    "upload": lambda s, h: s.http.put("/v1/files", content=b"unauthenticated bytes", headers=h),
    "list-jobs": lambda s, h: s.http.get("/v1/jobs", headers=h),
    "create-job": lambda s, h: s.http.post("/v1/jobs", json={}, headers=h),
    "get-job": lambda s, h: s.http.get("/v1/jobs/job_x", headers=h),
    "artifacts": lambda s, h: s.http.get("/v1/jobs/job_x/artifacts/report.json", headers=h),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "UNAUTHENTICATED"),
        ("Basic YWRtaW46YWRtaW4=", "UNAUTHENTICATED"),
        ("Bearer", "UNAUTHENTICATED"),
        ("Bearer ak_not-a-real-key", "INVALID_API_KEY"),
        ("Bearer " + "ak_" + "A" * 5000, "INVALID_API_KEY"),
        ("Bearer ' OR '1'='1", "INVALID_API_KEY"),
    ],
    ids=["none", "basic", "empty-bearer", "unknown", "overlong", "sql-ish"],
)
def test_calls_without_a_valid_key_are_401(
    service: Deployment, call: Call, header: str | None, code: str
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = call(service, headers)
    assert_problem(response, 401, code)
    assert response.headers["www-authenticate"].startswith("Bearer")
    stored = hashlib.sha256(b"unauthenticated bytes").hexdigest()
    assert not list((service.blobs / "sha256").rglob(stored))


def test_a_revoked_key_stops_working(service: Deployment) -> None:
    key_id, key = service.new_revocable_key("revoked")
    assert service.http.get("/v1/jobs", headers=service.auth(key)).status_code == 200
    file_id = service.upload(WEIGHTS, key)
    service.revoke(key_id)
    assert_problem(service.http.get("/v1/jobs", headers=service.auth(key)), 401, "INVALID_API_KEY")
    assert_problem(service.put(b"after revocation", key), 401, "INVALID_API_KEY")
    body = {"checkpoint_file": file_id, "dataset_file": file_id, "model": "ViT-B-32"}
    assert_problem(service.create(body, key), 401, "INVALID_API_KEY")


def test_another_tenants_ids_are_not_found(service: Deployment) -> None:
    """Tenant ``owner`` runs a job (it fails fast); tenant ``other`` tries every id it learnt."""
    owner, other = service.new_key("owner"), service.new_key("other")
    files = {
        "checkpoint_file": service.upload(WEIGHTS, owner),
        "dataset_file": service.upload(DATASET, owner),
        "model_config_file": service.upload(json.dumps(TINY_MODEL_CFG).encode(), owner),
    }
    job = service.run(service.create(files, owner), owner)
    assert_failed(job, "CHECKPOINT_ARCHITECTURE_MISMATCH")  # random weights for a real config
    job_id = job["id"]
    as_other = service.auth(other)
    for response in (
        service.http.get(f"/v1/jobs/{job_id}", headers=as_other),
        service.http.post(f"/v1/jobs/{job_id}/cancel", headers=as_other),
        service.http.get(f"/v1/jobs/{job_id}/artifacts", headers=as_other),
        service.http.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers=as_other),
        service.http.get(f"/v1/jobs/{job_id.upper()}", headers=as_other),
        service.http.get(f"/v1/jobs/{job_id}%00", headers=as_other),
    ):
        assert_problem(response, 404, "JOB_NOT_FOUND")
    assert service.http.get("/v1/jobs", headers=as_other).json()["jobs"] == []
    own_files = {
        "checkpoint_file": service.upload(WEIGHTS, other),
        "dataset_file": service.upload(DATASET, other),
    }
    for field, stolen in files.items():  # each of owner's ids, alone among other's own
        body = {**own_files, field: stolen, "model": "ViT-B-32"}
        problem = assert_problem(service.create(body, other), 404, "FILE_NOT_FOUND")
        assert problem["field"] == field
    assert own_files["checkpoint_file"] != files["checkpoint_file"]  # same bytes, own id
