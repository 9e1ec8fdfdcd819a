"""The suite's lab model and purify options, in one place for the tests and ``bench/spread.py``.

``ANTIDOTE_TEST_SEED`` (default 0) seeds both, so that the engine tests can be run at other
seeds: a seed changes the trajectory of training and purification much as another CPU does.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from pydantic import BaseModel

from worker.cbpt.options import PurifyOptions, TuningSettings
from worker.cbpt.purify import PurifyResult
from worker.lab.make import LabSettings

M = TypeVar("M", bound=BaseModel)

SUITE_SEED = int(os.environ.get("ANTIDOTE_TEST_SEED", "0"))


def suite_lab_settings(seed: int = SUITE_SEED) -> LabSettings:
    """The tiny lab model every engine test trains once a session."""
    return LabSettings.tiny(seed=seed)


def suite_options(seed: int = SUITE_SEED) -> PurifyOptions:
    """The shipped inversion, tuning and rounds, tuned whatever the verdict (``purify_lab``
    runs them on the CPU)."""
    # what the verdict says of 16 px suite models is not what is tested
    return PurifyOptions(seed=seed, tuning=TuningSettings(when_clean=True))


def merged(model: M, overrides: dict[str, Any]) -> M:
    """``model`` with ``overrides`` merged into it, nested settings field by field, validated."""
    data = model.model_dump()
    for key, value in overrides.items():
        nested = data.get(key)
        data[key] = (
            nested | value if isinstance(nested, dict) and isinstance(value, dict) else value
        )
    return type(model).model_validate(data)


def report_of(result: PurifyResult) -> dict[str, Any]:
    """The report as ``report.json`` holds it."""
    return result.report.model_dump(mode="json")
