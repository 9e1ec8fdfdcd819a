"""Service fixtures: an embedded (SQLite) data dir and an in-process API with a tenant's key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings
from tests.service.support import embedded_settings, new_key


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return embedded_settings(tmp_path / "var")


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, reaper=False)) as client:
        client.headers["Authorization"] = f"Bearer {new_key(settings, 'acme')}"
        yield client
