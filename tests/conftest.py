"""Session-wide test material: tiny lab CLIPs trained once, on scikit-learn's digits; and the
PostgreSQL and Redis that CI provides.

``.ci/run`` exports ANTIDOTE_TEST_DATABASE_URL and ANTIDOTE_TEST_BROKER_URL; with them set, a
service that does not answer fails the run. Without them (a laptop with no PostgreSQL), the
PostgreSQL and Redis cases are skipped and say why.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import text

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from service.db import engine_for
from service.migrations import upgrade
from service.settings import Settings
from tests.suite import suite_lab_settings
from worker.lab.make import LabModel, LabSettings, make_lab_model


@pytest.fixture(scope="session")
def lab_settings() -> LabSettings:
    return suite_lab_settings()


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lab-cache")


@pytest.fixture(scope="session")
def clean_lab(
    tmp_path_factory: pytest.TempPathFactory, lab_settings: LabSettings, lab_cache: Path
) -> LabModel:
    out = tmp_path_factory.mktemp("lab") / "clean"
    return make_lab_model(None, out, lab_settings, cache_dir=lab_cache)


@pytest.fixture(scope="session")
def badnets_lab(
    tmp_path_factory: pytest.TempPathFactory,
    lab_settings: LabSettings,
    lab_cache: Path,
    clean_lab: LabModel,
) -> LabModel:
    out = tmp_path_factory.mktemp("lab") / "badnets"
    return make_lab_model("badnets", out, lab_settings, cache_dir=lab_cache)


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
