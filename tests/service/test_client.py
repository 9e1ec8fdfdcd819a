"""The client against a scripted transport: error mapping, paging, idempotent retries, polling
and the SHA-256 checks on both directions of file transfer."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import service.client.api as client_module
from service.client import (
    AntidoteClient,
    AntidoteError,
    ApiError,
    ClientError,
    Conflict,
    IntegrityError,
    InvalidRequest,
    Job,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    ServerError,
    Summary,
    Unauthorized,
    WaitTimeout,
)

BASE = "http://antidote.test"
Handler = Callable[[httpx.Request], httpx.Response]


class LazyTransport(httpx.BaseTransport):
    """Unlike MockTransport, hands the request over unread, so a test sees how the body arrives."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.handler(request)


def make_client(
    handler: Handler, api_key: str | None = "secret", *, lazy: bool = False
) -> AntidoteClient:
    transport = LazyTransport(handler) if lazy else httpx.MockTransport(handler)
    return AntidoteClient(BASE, api_key, transport=transport)


def job_body(job_id: str = "j1", state: str = "RUNNING", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job_id,
        "state": state,
        "done": state in ("SUCCEEDED", "FAILED", "CANCELLED"),
        "stage": "inversion",
        "progress": 0.25,
        "attempt": 1,
        "create_time": "2025-01-02T03:04:05Z",
        "start_time": None,
        "update_time": "2025-01-02T03:04:06Z",
        "end_time": None,
        "request": {"checkpoint_file": "f1"},
        "result": None,
        "error": None,
    }
    body.update(extra)
    return body


def problem(status: int, code: str, detail: str) -> httpx.Response:
    return httpx.Response(
        status,
        json={
            "type": f"https://antidote.test/problems/{code}",
            "title": "Something",
            "status": status,
            "detail": detail,
            "instance": "/v1/jobs/j1",
            "code": code,
        },
        headers={"Content-Type": "application/problem+json"},
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeClock:
    """Stands in for the ``time`` module so polling tests neither sleep nor race."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(client_module, "time", fake)
    return fake


# ------------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, InvalidRequest),
        (401, Unauthorized),
        (403, ClientError),
        (404, NotFound),
        (409, Conflict),
        (413, PayloadTooLarge),
        (422, InvalidRequest),
        (429, ClientError),
        (500, ServerError),
        (503, ServerError),
    ],
)
def test_problem_details_map_to_typed_errors(status: int, expected: type[ApiError]) -> None:
    client = make_client(lambda request: problem(status, "some_code", "it went wrong"))
    with pytest.raises(expected) as caught:
        client.get("j1")
    error = caught.value
    assert type(error) is expected
    assert error.status == status
    assert error.code == "some_code"
    assert error.title == "Something"
    assert error.detail == "it went wrong"
    assert error.problem["instance"] == "/v1/jobs/j1"


def test_hierarchy() -> None:
    for leaf in (InvalidRequest, Unauthorized, NotFound, Conflict, PayloadTooLarge):
        assert issubclass(leaf, ClientError)
    assert issubclass(ClientError, ApiError)
    assert issubclass(ServerError, ApiError)
    for error in (ApiError, IntegrityError, JobFailed, WaitTimeout):
        assert issubclass(error, AntidoteError)


def test_html_error_page_from_a_proxy() -> None:
    page = "<html><body>upstream timed out</body></html>"
    client = make_client(
        lambda request: httpx.Response(502, text=page, headers={"Content-Type": "text/html"})
    )
    with pytest.raises(ServerError) as caught:
        client.get("j1")
    assert caught.value.code == "BAD_GATEWAY"
    assert caught.value.title == "Bad Gateway"
    assert "upstream timed out" in caught.value.detail
    assert caught.value.problem["status"] == 502


def test_bare_framework_errors() -> None:
    responses = iter(
        [
            httpx.Response(404, json={"detail": "Not Found"}),
            httpx.Response(
                422,
                json={"detail": [{"loc": ["body", "options", "seed"], "msg": "too large"}]},
            ),
            httpx.Response(500),
        ]
    )
    client = make_client(lambda request: next(responses))
    with pytest.raises(NotFound) as not_found:
        client.get("j1")
    assert (not_found.value.code, not_found.value.detail) == ("NOT_FOUND", "Not Found")
    with pytest.raises(InvalidRequest) as invalid:
        client.get("j1")
    assert invalid.value.detail == "body.options.seed: too large"
    with pytest.raises(ServerError) as server:
        client.get("j1")
    assert (server.value.code, server.value.detail) == (
        "INTERNAL_SERVER_ERROR",
        "Internal Server Error",
    )


def test_malformed_success_body_is_an_antidote_error() -> None:
    client = make_client(lambda request: httpx.Response(200, text="not json"))
    with pytest.raises(AntidoteError) as caught:
        client.get("j1")
    assert not isinstance(caught.value, ApiError)


# ------------------------------------------------------------------------------ auth and routes


def test_bearer_key_and_quoted_ids() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=job_body("a/b"))

    make_client(handler).get("a/b")
    assert seen[0].headers["Authorization"] == "Bearer secret"
    assert seen[0].url.raw_path == b"/v1/jobs/a%2Fb"


def test_no_key_no_header() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=job_body())

    make_client(handler, api_key=None).get("j1")
    assert "Authorization" not in seen[0].headers


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=job_body())

    transport = httpx.MockTransport(handler)
    monkeypatch.setenv("ANTIDOTE_URL", "http://env.test:9000/prefix")
    monkeypatch.setenv("ANTIDOTE_API_KEY", "from-env")
    with AntidoteClient.from_env(transport=transport) as client:
        client.get("j1")
    assert str(seen[0].url) == "http://env.test:9000/prefix/v1/jobs/j1"
    assert seen[0].headers["Authorization"] == "Bearer from-env"

    with AntidoteClient.from_env(api_key="explicit", transport=transport) as client:
        client.get("j1")
    assert seen[1].headers["Authorization"] == "Bearer explicit"

    monkeypatch.delenv("ANTIDOTE_URL")
    monkeypatch.delenv("ANTIDOTE_API_KEY")
    with AntidoteClient.from_env(transport=transport) as client:
        client.get("j1")
    assert str(seen[2].url) == "http://127.0.0.1:8000/v1/jobs/j1"
    assert "Authorization" not in seen[2].headers


def test_cancel() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json=job_body(state="CANCELLING"))

    job = make_client(handler).cancel("j1")
    assert (seen[0].method, seen[0].url.path) == ("POST", "/v1/jobs/j1/cancel")
    assert job.state == "CANCELLING"
    assert not job.done


# ------------------------------------------------------------------------------------ job model


def test_job_fields_and_result() -> None:
    result = {
        "verdict": "backdoored",
        "suspected_target": "cat",
        "summary": {
            "ca_before": 0.9,
            "ca_after": 0.88,
            "asr_before": 0.99,
            "asr_after": 0.02,
            "fidelity": None,
        },
        "artifacts": [{"name": "prompts.pt", "size": 3, "sha256": "ab" * 32, "url": "/x"}],
    }
    job = Job.from_dict(job_body(state="SUCCEEDED", result=result, extra_field=1))
    assert job.done
    assert job.succeeded
    assert job.raise_for_error() is job
    assert job.create_time is not None
    assert job.create_time.year == 2025
    assert job.result is not None
    assert job.result.suspected_target == "cat"
    assert job.result.summary.asr_after == pytest.approx(0.02)
    assert job.result.summary.fidelity is None
    assert job.result.artifacts[0].name == "prompts.pt"
    assert job.raw["extra_field"] == 1


def test_unknown_states_are_tolerated() -> None:
    assert not Job.from_dict(job_body(state="PAUSED", done=False)).done
    ended = Job.from_dict(job_body(state="ARCHIVED", done=True, error={"code": "gone"}))
    assert ended.done
    with pytest.raises(JobFailed):
        ended.raise_for_error()
    # Without the flag, the known terminal states still end the wait.
    body = job_body(state="FAILED")
    del body["done"]
    assert Job.from_dict(body).done


@pytest.mark.parametrize("state", ["FAILED", "CANCELLED"])
def test_raise_for_error(state: str) -> None:
    error = {
        "type": "about:blank",
        "title": "Bad input",
        "detail": "no classes",
        "code": "bad_data",
    }
    job = Job.from_dict(job_body(state=state, error=error))
    with pytest.raises(JobFailed) as caught:
        job.raise_for_error()
    assert caught.value.job is job
    assert (caught.value.code, caught.value.detail) == ("bad_data", "no classes")


# ---------------------------------------------------------------------------------------- paging


def test_list_follows_page_tokens() -> None:
    pages = {
        None: {"jobs": [job_body("a"), job_body("b")], "next_page_token": "t1"},
        "t1": {"jobs": [job_body("c")], "next_page_token": "t2"},
        "t2": {"jobs": [], "next_page_token": None},
    }
    seen: list[httpx.QueryParams] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs"
        seen.append(request.url.params)
        return httpx.Response(200, json=pages[request.url.params.get("page_token")])

    jobs = list(make_client(handler).list(state="RUNNING", page_size=2))
    assert [job.id for job in jobs] == ["a", "b", "c"]
    assert [params.get("page_token") for params in seen] == [None, "t1", "t2"]
    assert all(params["state"] == "RUNNING" for params in seen)
    assert all(params["page_size"] == "2" for params in seen)


def test_list_is_lazy_and_omits_unset_filters() -> None:
    seen: list[httpx.QueryParams] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params)
        return httpx.Response(200, json={"jobs": [job_body("a")], "next_page_token": "more"})

    first = next(make_client(handler).list())
    assert first.id == "a"
    assert len(seen) == 1
    assert "state" not in seen[0]
    assert "page_size" not in seen[0]


def test_list_refuses_a_repeated_token() -> None:
    client = make_client(
        lambda request: httpx.Response(200, json={"jobs": [], "next_page_token": "same"})
    )
    with pytest.raises(AntidoteError):
        list(client.list())


# ---------------------------------------------------------------------------- uploads and submit


class FakeService:
    """Stores uploads like the service does and scripts the job POST."""

    def __init__(self) -> None:
        self.uploads: dict[str, bytes] = {}
        self.upload_requests: list[httpx.Request] = []
        self.chunk_counts: list[int] = []
        self.posts: list[httpx.Request] = []
        self.post_failures = 0
        self.tamper = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and request.url.path == "/v1/files":
            self.upload_requests.append(request)
            assert isinstance(request.stream, httpx.SyncByteStream)
            chunks = list(request.stream)
            self.chunk_counts.append(len(chunks))
            data = b"".join(chunks)
            file_id = f"f{len(self.uploads) + 1}"
            self.uploads[file_id] = data
            digest = sha(data + b"x" if self.tamper else data)
            return httpx.Response(201, json={"id": file_id, "sha256": digest, "size": len(data)})
        if request.method == "POST" and request.url.path == "/v1/jobs":
            self.posts.append(request)
            if self.post_failures:
                self.post_failures -= 1
                raise httpx.ConnectError("connection reset", request=request)
            return httpx.Response(
                202,
                json=job_body(state="PENDING"),
                headers={"Location": "/v1/jobs/j1", "Retry-After": "1"},
            )
        return httpx.Response(404)


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(bytes(range(256)) * 40)
    dataset = tmp_path / "fewshot.zip"
    dataset.write_bytes(b"PK dataset bytes")
    return checkpoint, dataset


def test_upload_streams_and_checks_the_digest(
    monkeypatch: pytest.MonkeyPatch, inputs: tuple[Path, Path]
) -> None:
    monkeypatch.setattr(client_module, "_CHUNK", 1000)
    service = FakeService()
    checkpoint, _ = inputs
    ref = make_client(service, lazy=True).upload(checkpoint)
    data = checkpoint.read_bytes()
    assert service.uploads[ref.id] == data
    assert (ref.sha256, ref.size) == (sha(data), len(data))
    # The body went out in chunks, with an explicit length and no chunked encoding.
    assert service.chunk_counts == [11]
    request = service.upload_requests[0]
    assert request.headers["Content-Length"] == str(len(data))
    assert request.headers["Content-Type"] == "application/octet-stream"
    assert "Transfer-Encoding" not in request.headers


def test_upload_digest_mismatch(inputs: tuple[Path, Path]) -> None:
    service = FakeService()
    service.tamper = True
    with pytest.raises(IntegrityError):
        make_client(service).upload(inputs[0])


def test_upload_size_mismatch(inputs: tuple[Path, Path]) -> None:
    data = inputs[1].read_bytes()

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        return httpx.Response(201, json={"id": "f1", "sha256": sha(data), "size": len(data) + 1})

    with pytest.raises(IntegrityError):
        make_client(handler).upload(inputs[1])


def test_upload_verifies_even_when_the_body_is_not_read(inputs: tuple[Path, Path]) -> None:
    data = inputs[0].read_bytes()
    client = make_client(
        lambda request: httpx.Response(
            201, json={"id": "f1", "sha256": sha(data), "size": len(data)}
        ),
        lazy=True,
    )
    assert client.upload(inputs[0]).sha256 == sha(data)


def test_upload_too_large(inputs: tuple[Path, Path]) -> None:
    client = make_client(
        lambda request: problem(413, "file_too_large", "files are limited to 10 bytes")
    )
    with pytest.raises(PayloadTooLarge) as caught:
        client.upload(inputs[0])
    assert caught.value.code == "file_too_large"


def test_submit_uploads_then_posts(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    config = tmp_path / "arch.json"
    config.write_text('{"embed_dim": 64}')
    service = FakeService()
    spec = {"name": "badnets", "target": 3}
    job = make_client(service).submit(
        *inputs,
        model_config=config,
        known_triggers=[spec],
        options={"seed": 7},
    )
    assert job.id == "j1"
    assert job.state == "PENDING"
    assert service.uploads == {
        "f1": inputs[0].read_bytes(),
        "f2": inputs[1].read_bytes(),
        "f3": config.read_bytes(),
    }
    (post,) = service.posts
    assert json.loads(post.content) == {
        "checkpoint_file": "f1",
        "dataset_file": "f2",
        "model": None,
        "model_config_file": "f3",
        "known_triggers": [spec],
        "options": {"seed": 7},
    }
    uuid.UUID(post.headers["Idempotency-Key"])


def test_submit_retries_once_with_the_same_key(inputs: tuple[Path, Path]) -> None:
    service = FakeService()
    service.post_failures = 1
    job = make_client(service).submit(*inputs, model="ViT-B-32")
    assert job.id == "j1"
    assert len(service.posts) == 2
    keys = {post.headers["Idempotency-Key"] for post in service.posts}
    assert len(keys) == 1
    # Only the POST is repeated; the files went up once.
    assert len(service.uploads) == 2
    assert json.loads(service.posts[1].content)["model"] == "ViT-B-32"


def test_submit_gives_up_after_one_retry(inputs: tuple[Path, Path]) -> None:
    service = FakeService()
    service.post_failures = 2
    with pytest.raises(httpx.ConnectError):
        make_client(service).submit(*inputs, idempotency_key="mine")
    assert [post.headers["Idempotency-Key"] for post in service.posts] == ["mine", "mine"]


def test_each_submit_gets_its_own_key(inputs: tuple[Path, Path]) -> None:
    service = FakeService()
    client = make_client(service)
    client.submit(*inputs)
    client.submit(*inputs)
    assert (
        service.posts[0].headers["Idempotency-Key"] != service.posts[1].headers["Idempotency-Key"]
    )


# ----------------------------------------------------------------------------------------- wait


def scripted(responses: list[httpx.Response]) -> Handler:
    queue: Iterator[httpx.Response] = iter(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/j1"
        return next(queue)

    return handler


def test_wait_caps_retry_after_at_poll(clock: FakeClock) -> None:
    running = job_body()
    handler = scripted(
        [
            httpx.Response(200, json=running, headers={"Retry-After": "5"}),
            httpx.Response(200, json=running, headers={"Retry-After": "1"}),
            httpx.Response(200, json=running),
            httpx.Response(
                200, json=running, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
            ),
            httpx.Response(200, json=job_body(state="SUCCEEDED", progress=1.0)),
        ]
    )
    seen: list[Job] = []
    job = make_client(handler).wait("j1", poll=2.0, on_progress=seen.append)
    assert job.state == "SUCCEEDED"
    assert clock.sleeps == [2.0, 1.0, 2.0, 0.0]
    assert [snapshot.state for snapshot in seen] == ["RUNNING"] * 4 + ["SUCCEEDED"]


def test_wait_returns_failed_jobs(clock: FakeClock) -> None:
    failed = job_body(state="FAILED", error={"code": "bad_data", "detail": "empty"})
    job = make_client(scripted([httpx.Response(200, json=failed)])).wait("j1")
    assert job.state == "FAILED"
    assert clock.sleeps == []
    with pytest.raises(JobFailed):
        job.raise_for_error()


def test_wait_timeout(clock: FakeClock) -> None:
    client = make_client(lambda request: httpx.Response(200, json=job_body()))
    with pytest.raises(WaitTimeout) as caught:
        client.wait("j1", poll=1.0, timeout=2.5)
    assert clock.sleeps == [1.0, 1.0, 0.5]
    assert caught.value.job.state == "RUNNING"


def test_wait_propagates_api_errors(clock: FakeClock) -> None:
    client = make_client(lambda request: problem(404, "job_not_found", "no job j1"))
    with pytest.raises(NotFound):
        client.wait("j1")


# ------------------------------------------------------------------------------------ downloads


ARTIFACTS = {"prompts.pt": b"prompt weights" * 100, "report.json": b'{"verdict": "clean"}'}


def artifact_service(
    contents: dict[str, bytes], *, listed: dict[str, bytes] | None = None, etag: str | None = None
) -> tuple[Handler, list[httpx.Request]]:
    """Lists ``listed`` (default: ``contents``) but serves ``contents``."""
    listing = listed if listed is not None else contents
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        assert request.url.host == "antidote.test"
        assert request.headers["Authorization"] == "Bearer secret"
        if request.url.path == "/v1/jobs/j1/artifacts":
            items = [
                {
                    "name": name,
                    "size": len(data),
                    "sha256": sha(data),
                    "url": f"https://elsewhere.test/{name}",
                }
                for name, data in listing.items()
            ]
            return httpx.Response(200, json={"artifacts": items})
        name = request.url.path.rsplit("/", 1)[-1]
        if name not in contents:
            return problem(404, "artifact_not_found", f"no artifact {name}")
        data = contents[name]
        tag = etag if etag is not None else f'"sha256:{sha(data)}"'
        return httpx.Response(200, content=data, headers={"ETag": tag})

    return handler, seen


def test_download(tmp_path: Path) -> None:
    handler, seen = artifact_service(ARTIFACTS)
    out = tmp_path / "out" / "nested"
    paths = make_client(handler).download("j1", out)
    assert paths == [out / "prompts.pt", out / "report.json"]
    for path in paths:
        assert path.read_bytes() == ARTIFACTS[path.name]
    assert sorted(p.name for p in out.iterdir()) == ["prompts.pt", "report.json"]
    # The listing's url points elsewhere; the key must not follow it.
    assert [request.url.path for request in seen[1:]] == [
        "/v1/jobs/j1/artifacts/prompts.pt",
        "/v1/jobs/j1/artifacts/report.json",
    ]


def test_artifacts_listing() -> None:
    handler, _ = artifact_service(ARTIFACTS)
    refs = make_client(handler).artifacts("j1")
    assert [(ref.name, ref.size, ref.sha256) for ref in refs] == [
        (name, len(data), sha(data)) for name, data in ARTIFACTS.items()
    ]


@pytest.mark.parametrize(
    "served",
    [
        {"prompts.pt": b"tampered weights"},  # other bytes
        {"prompts.pt": ARTIFACTS["prompts.pt"][:-1]},  # truncated
    ],
)
def test_download_mismatch_leaves_nothing(tmp_path: Path, served: dict[str, bytes]) -> None:
    listed = {"prompts.pt": ARTIFACTS["prompts.pt"]}
    handler, _ = artifact_service(served, listed=listed, etag='W/"whatever"')
    with pytest.raises(IntegrityError):
        make_client(handler).download("j1", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_etag_disagreeing_with_listing(tmp_path: Path) -> None:
    handler, _ = artifact_service(ARTIFACTS, etag=f'"sha256:{"0" * 64}"')
    with pytest.raises(IntegrityError):
        make_client(handler).download("j1", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_error_leaves_no_partial_file(tmp_path: Path) -> None:
    handler, _ = artifact_service({}, listed={"prompts.pt": b"x"})
    with pytest.raises(NotFound):
        make_client(handler).download("j1", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_keeps_the_old_file_on_mismatch(tmp_path: Path) -> None:
    (tmp_path / "prompts.pt").write_bytes(b"previous good copy")
    handler, _ = artifact_service(
        {"prompts.pt": b"bad"}, listed={"prompts.pt": b"good"}, etag='"x"'
    )
    with pytest.raises(IntegrityError):
        make_client(handler).download("j1", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["prompts.pt"]
    assert (tmp_path / "prompts.pt").read_bytes() == b"previous good copy"


@pytest.mark.parametrize("name", ["../escape.pt", "..", "a/b.pt", "a\\b.pt"])
def test_download_refuses_names_outside_the_folder(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    handler, seen = artifact_service({name: b"x"})
    with pytest.raises(IntegrityError):
        make_client(handler).download("j1", out)
    assert len(seen) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_client_reads_every_field_of_the_engines_summary() -> None:
    """The client mirrors ``outcome.Summary`` without importing the engine; this holds the two
    to the same fields, so that a field added to one is added to the other."""
    import dataclasses

    from worker.cbpt.outcome import Summary as EngineSummary

    assert [f.name for f in dataclasses.fields(Summary)] == list(EngineSummary.model_fields)
