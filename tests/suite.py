"""The suite's lab model and purify options, in one place for the tests and ``bench/spread.py``.

``ANTIDOTE_TEST_SEED`` (default 0) seeds both, so that the engine tests can be run at other
seeds: a seed changes the trajectory of training and purification much as another CPU does.
"""

from __future__ import annotations

import os

from worker.cbpt.purify import PurifyOptions
from worker.lab.make import LabSettings

SUITE_SEED = int(os.environ.get("ANTIDOTE_TEST_SEED", "0"))


def suite_lab_settings(seed: int = SUITE_SEED) -> LabSettings:
    """The tiny lab model every engine test trains once a session."""
    return LabSettings.tiny(seed=seed)


def suite_options(seed: int = SUITE_SEED) -> PurifyOptions:
    """The shipped inversion, tuning and rounds, on the CPU, tuned whatever the verdict."""
    return PurifyOptions(
        seed=seed,
        device="cpu",
        tune_when_clean=True,  # what the verdict says of 16 px suite models is not what is tested
    )
