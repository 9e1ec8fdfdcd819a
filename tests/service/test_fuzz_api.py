"""Generated requests against the API's own OpenAPI document, in process.

The document is what clients and their generated SDKs are built from, so every answer has to
match it: a status it lists, the content type it names, a body of the schema it gives. Any 5xx
on generated input is a bug on our side. The profile is short enough for every run; the longer
one is ``bench/fuzz.py``.

The app is built when the module is imported because the operations to parametrize over come
from its document; its data lives in a temporary folder removed at exit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, CheckFunction, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service import jobs
from service.api import create_app
from service.blobs import BlobStore
from service.db import session_factory, transaction
from service.migrations import upgrade
from service.models import Artifact, Job
from service.settings import Settings
from tests.service.support import new_key
from tests.service.test_api import dataset, weights

CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
SHORT = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

_data = tempfile.TemporaryDirectory(prefix="antidote-fuzz-")
SETTINGS = Settings(data_dir=Path(_data.name))
upgrade(SETTINGS.database)
APP = create_app(SETTINGS, reaper=False)
# A real key: without one every case would stop at the 401 and test nothing behind it.
HEADERS = {"Authorization": f"Bearer {new_key(SETTINGS, 'fuzz')}"}

schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def _files() -> dict[str, str]:
    with TestClient(APP, headers=HEADERS) as client:
        ids = {
            name: client.put("/v1/files", content=body).json()["id"]
            for name, body in (("checkpoint_file", weights()), ("dataset_file", dataset()))
        }
    return {**ids, "model": "ViT-B-32"}


def _finished_job() -> str:
    """A job with artifacts, which only a worker makes: written straight to the database."""
    source = Path(_data.name) / "report.json"
    source.write_bytes(b'{"verdict": "clean"}')
    blob = BlobStore(SETTINGS.blobs).put_file(source)
    job_id = jobs.new_job_id()
    with transaction(session_factory(SETTINGS.database)) as session:
        session.add(Job(id=job_id, tenant="fuzz", request={}, state="SUCCEEDED"))
        session.flush()
        session.add(
            Artifact(
                job_id=job_id,
                name="report.json",
                sha256=blob.sha256,
                size=blob.size,
                media_type="application/json",
            )
        )
    return job_id


REAL_FILES = _files()
FINISHED_JOB = _finished_job()


@schema.parametrize()
@SHORT
def test_api_answers_as_documented(case: Case[Any]) -> None:
    case.call_and_validate(headers=HEADERS, checks=CHECKS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_job_requests_on_real_files(mode: GenerationMode) -> None:
    """Generated file ids stop at a 404; real ones carry the generated options and trigger
    specs on to the engine's own validators, where a 5xx would hide."""

    @given(case=schema["/v1/jobs"]["POST"].as_strategy(mode))
    @SHORT
    def run(case: Case[Any]) -> None:
        if case.media_type == "application/json" and isinstance(case.body, dict):
            case.body.update(REAL_FILES)
        case.call_and_validate(headers=HEADERS, checks=CHECKS)

    run()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/{job_id}"),
        ("POST", "/v1/jobs/{job_id}/cancel"),
        ("GET", "/v1/jobs/{job_id}/artifacts"),
        ("GET", "/v1/jobs/{job_id}/artifacts/{name}"),
    ],
)
def test_operations_on_a_finished_job(method: str, path: str) -> None:
    """The 200, 206, 304, 409 and 416 answers only exist for a job that has ended."""

    @given(case=schema[path][method].as_strategy())
    @settings(SHORT, max_examples=15)
    def run(case: Case[Any]) -> None:
        pins = {"job_id": FINISHED_JOB, "name": "report.json"}
        case.path_parameters = {key: pins[key] for key in case.path_parameters or {}}
        case.call_and_validate(headers=HEADERS, checks=CHECKS)

    run()


@pytest.mark.parametrize(
    ("header", "status", "code"),
    [("bytes=5-2", 400, "RANGE_INVALID"), ("bytes=999-", 416, "RANGE_NOT_SATISFIABLE")],
)
def test_a_bad_range_is_a_problem_like_any_other_error(header: str, status: int, code: str) -> None:
    """Found by the profile above: the file response answered these in text/plain."""
    with TestClient(APP, headers=HEADERS) as client:
        url = f"/v1/jobs/{FINISHED_JOB}/artifacts/report.json"
        response = client.get(url, headers={"Range": header})
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code


def test_every_operation_is_documented() -> None:
    """A guard for the tests above: a document that lost a route would pass them trivially."""
    documented = {(m.upper(), p) for p, ops in APP.openapi()["paths"].items() for m in ops}
    assert documented == {
        ("PUT", "/v1/files"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{job_id}"),
        ("POST", "/v1/jobs/{job_id}/cancel"),
        ("GET", "/v1/jobs/{job_id}/artifacts"),
        ("GET", "/v1/jobs/{job_id}/artifacts/{name}"),
        ("GET", "/livez"),
        ("GET", "/readyz"),
    }
