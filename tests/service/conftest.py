"""Service fixtures: SQLite (embedded) everywhere; PostgreSQL and Redis where CI provides them.

``.ci/run`` exports ANTIDOTE_TEST_DATABASE_URL and ANTIDOTE_TEST_BROKER_URL; with them set, a
service that does not answer fails the run. Without them (a laptop with no PostgreSQL), the
PostgreSQL and Redis cases are skipped and say why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.api import create_app
from service.db import engine_for
from service.migrations import upgrade
from service.settings import Settings
from tests.service.support import embedded_settings, new_key


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set (.ci/run sets it); PostgreSQL/Redis cases not run")
    return value


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The test database, emptied and migrated once per session."""
    raw = _required_env("ANTIDOTE_TEST_DATABASE_URL")
    url = Settings(database_url=raw).database
    try:
        with engine_for(url).begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    except Exception as exc:  # in CI a missing service is a failure, never a skip
        pytest.fail(f"PostgreSQL at {raw} does not answer: {exc}")
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = _required_env("ANTIDOTE_TEST_BROKER_URL")
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=3)
        client.flushdb()
        client.close()
    except Exception as exc:
        pytest.fail(f"Redis at {url} does not answer: {exc}")
    return url


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return embedded_settings(tmp_path / "var")


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, reaper=False)) as client:
        client.headers["Authorization"] = f"Bearer {new_key(settings, 'acme')}"
        yield client
