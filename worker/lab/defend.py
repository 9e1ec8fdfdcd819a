"""Purifying a lab folder as the benchmarks and tests measure it: its shots, scored on its test set.

A lab folder holds far more test images than a job's held-out split, so every shot tunes and the
test set measures; the folder's own ``attack.json`` is the known trigger whose ASR matters.
"""

from __future__ import annotations

from pathlib import Path

from worker.cbpt.attacks import AttackSpec
from worker.cbpt.options import PurifyOptions, Runtime
from worker.cbpt.progress import Progress
from worker.cbpt.purify import Inputs, PurifyResult, purify
from worker.lab.evaluate import lab_attack

_CPU = Runtime("cpu")  # the lab is measured on the CPU unless a caller says otherwise


def purify_lab(
    directory: Path,
    options: PurifyOptions,
    out_dir: Path,
    *,
    known_triggers: tuple[AttackSpec, ...] | None = None,
    runtime: Runtime = _CPU,
    progress: Progress | None = None,
) -> PurifyResult:
    """``purify`` of the folder's ``fewshot.zip``, measured on its ``test.zip``.

    ``known_triggers`` defaults to the folder's own attack, so that its real ASR is reported.
    """
    if known_triggers is None:
        attack = lab_attack(directory)
        known_triggers = (attack,) if attack else ()
    inputs = Inputs(
        directory,
        directory / "fewshot.zip",
        known_triggers=known_triggers,
        evaluation_dataset=directory / "test.zip",
    )
    return purify(inputs, options, out_dir=out_dir, runtime=runtime, progress=progress)
