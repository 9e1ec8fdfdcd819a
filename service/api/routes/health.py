"""Probes and metrics: ``/livez`` depends on nothing; ``/readyz`` checks db, broker and disk."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.api.deps import StateDep
from service.api.schemas import Readiness
from service.api.state import AppState

router = APIRouter(tags=["health"])

MIN_FREE_BYTES = 1024**3


@router.get("/livez")
def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        200: {"model": Readiness, "description": "Ready"},
        503: {"model": Readiness, "description": "Not ready; see the failing check"},
    },
)
async def readyz(state: StateDep) -> JSONResponse:
    checks = await run_in_threadpool(_checks, state)
    ready = all(check["ok"] for check in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    body = await run_in_threadpool(generate_latest, state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _checks(state: AppState) -> dict[str, dict[str, object]]:
    return {
        "database": _timed(lambda: _database(state)),
        "broker": _timed(lambda: _broker(state)),
        "disk": _timed(lambda: _disk(state)),
    }


def _timed(check: Callable[[], str]) -> dict[str, object]:
    start = time.perf_counter()
    try:
        detail = check()
        ok = True
    except Exception as exc:  # a probe reports failures, it does not raise them
        detail, ok = f"{type(exc).__name__}: {exc}", False
    return {"ok": ok, "detail": detail, "seconds": round(time.perf_counter() - start, 4)}


def _database(state: AppState) -> str:
    with state.sessions() as session:
        session.execute(text("SELECT 1"))
    return "ok"


def _broker(state: AppState) -> str:
    if state.settings.embedded:
        folder = state.settings.broker_folder / "queue"
        if not folder.is_dir():
            raise RuntimeError(f"{folder} is missing")
        return "filesystem"
    with state.celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
    return "ok"


def _disk(state: AppState) -> str:
    free = state.blobs.free_bytes()
    needed = min(MIN_FREE_BYTES, state.settings.max_upload_bytes)
    if free < needed:
        raise RuntimeError(f"{free} bytes free, {needed} needed")
    return f"{free} bytes free"
