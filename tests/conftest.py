"""Session-wide test material: tiny lab CLIPs trained once, on scikit-learn's digits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from worker.lab.make import LabModel, LabSettings, make_lab_model


@pytest.fixture(scope="session")
def lab_settings() -> LabSettings:
    return LabSettings.tiny()


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
