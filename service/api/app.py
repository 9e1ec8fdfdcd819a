"""The app factory: routers, problem+json handlers, request ids, metrics and the reaper."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.publish import reap_and_republish
from service.api.routes import artifacts, files, health, jobs
from service.api.schemas import PROBLEM_CONTENT, JobRequest
from service.api.schemas import Problem as ProblemSchema
from service.api.state import AppState
from service.blobs import BlobStore
from service.broker import make_celery
from service.db import session_factory
from service.errors import PROBLEM_MEDIA_TYPE, Problem, error_pointers, problem_of
from service.logs import RequestIdMiddleware, configure_logging
from service.metrics import Metrics
from service.settings import Settings, get_settings
from worker.cbpt.errors import EngineError

log = structlog.get_logger()

HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    413: "REQUEST_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    416: "RANGE_NOT_SATISFIABLE",
}


# Named in the document by reference only (error responses, see ``problem_responses``, and the
# hand-written job request body), so FastAPI does not collect them by itself.
REFERENCED_MODELS: tuple[type[BaseModel], ...] = (ProblemSchema, JobRequest)


class _App(FastAPI):
    def openapi(self) -> dict[str, Any]:
        """Without these, the document's references dangle: code generators fail on them, and
        checks of a response against it cannot resolve the schema."""
        document = super().openapi()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in REFERENCED_MODELS:
            schemas.setdefault(model.__name__, model.model_json_schema())
        return document


def create_app(settings: Settings | None = None, *, reaper: bool = True) -> FastAPI:
    settings = settings or get_settings()
    configure_logging()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    sessions = session_factory(settings.database)
    state = AppState(
        settings=settings,
        sessions=sessions,
        blobs=BlobStore(settings.blobs),
        celery=make_celery(settings),
        metrics=Metrics(sessions),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        if reaper:
            await _reap_once(state)  # what a crash left behind
            task = asyncio.create_task(_reap_forever(state))
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = _App(
        title="clip-antidote",
        version="1",
        summary="Purifies backdoored CLIP models with class-wise backdoor prompt tuning.",
        lifespan=lifespan,
        responses={"default": {"description": "RFC 9457 problem", "content": PROBLEM_CONTENT}},
    )
    app.state.antidote = state
    for module in (files, jobs, artifacts, health):
        app.include_router(module.router)
    _install_handlers(app)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        state.metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        state.metrics.latency.labels(path).observe(time.perf_counter() - start)
        return response

    app.add_middleware(RequestIdMiddleware)
    return app


async def _reap_forever(state: AppState) -> None:
    """Every replica reaps; the compare-and-set updates make that safe."""
    while True:
        await asyncio.sleep(state.settings.reaper_interval_s)
        await _reap_once(state)


async def _reap_once(state: AppState) -> None:
    try:
        await run_in_threadpool(reap_and_republish, state)
    except Exception:  # a database outage must not stop the API or end the loop
        log.warning("reaper.failed", exc_info=True)


def _problem_response(request: Request, problem: Problem) -> JSONResponse:
    request_id = request.scope.get("state", {}).get("request_id")
    return JSONResponse(
        problem.body(instance=request.url.path, request_id=request_id),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=problem.headers,
    )


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> JSONResponse:
        return _problem_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = error_pointers(exc.errors())
        problem = Problem(422, "REQUEST_INVALID", "the request does not validate", errors=errors)
        return _problem_response(request, problem)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, f"HTTP_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else code
        problem = Problem(exc.status_code, code, detail, headers=dict(exc.headers or {}))
        return _problem_response(request, problem)

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return _problem_response(request, problem_of(exc))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request.failed")
        detail = "an internal error occurred; quote the request_id when reporting it"
        return _problem_response(request, problem_of(exc, internal_detail=detail))
