"""The suite's purification across seeds and intra-op thread counts: what its assertions rest on.

Floating point differs between CPUs (instruction sets, oneDNN and BLAS kernels, reduction
order), so a lab model trained and purified on one machine is one draw of what another machine
gets. A seed and a thread count each change the trajectory the way another CPU does, so this
builds the test suite's backdoored lab model and purifies it as ``tests/test_purify.py`` does at
every pair of ``--seeds`` and ``--threads``, and prints what the engine tests assert:

- the lab model's CA and its trigger's ASR before purification;
- the real trigger's ASR after, and its ratio to before (the cut);
- CA before and after;
- the inverted and the re-inverted (adaptive) trigger's ASR after.

Each pair trains its own clean base (a cache per thread count under ``--cache``), so the lab
model differs as it would on another machine::

    .venv/bin/python bench/spread.py [--seeds 0,1,2,3,4] [--threads 1,2] \\
        [--lab '{"poison_rate": 0.2}'] [--options '{"rounds": {"count": 2}}']

With ``--tests``, it runs those test files instead, once per pair (``ANTIDOTE_TEST_SEED`` and
``OMP_NUM_THREADS`` set), and prints what pytest counted for each::

    .venv/bin/python bench/spread.py --tests tests/test_purify.py,tests/test_lab.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.suite import merged, suite_lab_settings, suite_options
from worker.lab.defend import purify_lab
from worker.lab.evaluate import evaluate_lab_dir
from worker.lab.make import make_lab_model


@dataclass(frozen=True)
class Row:
    seed: int
    threads: int
    lab_ca: float
    asr_before: float
    asr_after: float
    ca_before: float
    ca_after: float
    inverted_after: float
    adaptive_after: float
    verdict: str
    seconds: float

    @property
    def cut(self) -> float:
        return self.asr_after / self.asr_before if self.asr_before else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--lab", default="{}", help="LabSettings overrides (JSON)")
    parser.add_argument("--options", default="{}", help="PurifyOptions overrides (JSON)")
    parser.add_argument("--cache", type=Path, default=Path("var/bench/spread-cache"))
    parser.add_argument("--out", type=Path, default=Path("var/bench/spread.json"))
    parser.add_argument("--tests", default="", help="run these test files at each pair instead")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    thread_counts = [int(count) for count in args.threads.split(",") if count]
    if args.tests:
        return _run_tests([path for path in args.tests.split(",") if path], seeds, thread_counts)
    lab_overrides: dict[str, Any] = json.loads(args.lab)
    option_overrides: dict[str, Any] = json.loads(args.options)
    console = Console(width=160)
    rows: list[Row] = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for seed in seeds:
            rows.append(
                _one(seed, threads, args.attack, lab_overrides, option_overrides, args.cache)
            )
            console.print(rows[-1])

    table = Table(
        title=f"suite {args.attack} model, lab {lab_overrides}, options {option_overrides}"
    )
    columns = ("threads", "seed", "lab CA", "ASR before", "ASR after", "cut", "CA before")
    for column in (*columns, "CA after", "inverted", "adaptive", "verdict", "s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row.threads),
            str(row.seed),
            f"{row.lab_ca:.3f}",
            f"{row.asr_before:.3f}",
            f"{row.asr_after:.3f}",
            f"{row.cut:.2f}",
            f"{row.ca_before:.3f}",
            f"{row.ca_after:.3f}",
            f"{row.inverted_after:.3f}",
            f"{row.adaptive_after:.3f}",
            row.verdict,
            f"{row.seconds:.0f}",
        )
    console.print(table)
    for name in ("asr_before", "asr_after", "cut", "ca_before", "ca_after"):
        values = [getattr(row, name) for row in rows]
        console.print(f"{name}: {min(values):.3f} to {max(values):.3f}")
    drop = [row.ca_before - row.ca_after for row in rows]
    console.print(f"CA lost: {min(drop):.3f} to {max(drop):.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(row) for row in rows], indent=1))
    return 0


def _run_tests(paths: list[str], seeds: list[int], thread_counts: list[int]) -> int:
    """pytest on ``paths`` at every pair, one process each; non-zero if any run failed."""
    console = Console(width=160)
    table = Table(title=f"pytest {' '.join(paths)}")
    for column in ("threads", "seed", "exit", "pytest says", "s"):
        table.add_column(column, justify="left" if column == "pytest says" else "right")
    failed = 0
    for threads in thread_counts:
        for seed in seeds:
            env = {**os.environ, "ANTIDOTE_TEST_SEED": str(seed), "OMP_NUM_THREADS": str(threads)}
            started = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            lines = run.stdout.strip().splitlines()
            said = lines[-1].strip("= ") if lines else run.stderr.strip()[-200:]
            failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
            console.print(f"threads {threads} seed {seed}: {said}", *failures, sep="\n")
            failed += run.returncode != 0
            row = (str(threads), str(seed), str(run.returncode), said)
            table.add_row(*row, f"{time.perf_counter() - started:.0f}")
    console.print(table)
    return 1 if failed else 0


def _one(
    seed: int,
    threads: int,
    attack: str,
    lab_overrides: dict[str, Any],
    option_overrides: dict[str, Any],
    cache: Path,
) -> Row:
    started = time.perf_counter()
    settings = merged(suite_lab_settings(seed), lab_overrides)
    options = merged(suite_options(seed), option_overrides)
    with tempfile.TemporaryDirectory() as scratch:
        lab = make_lab_model(
            attack, Path(scratch) / attack, settings, cache_dir=cache / f"threads-{threads}"
        )
        evaluation = evaluate_lab_dir(lab.directory)
        result = purify_lab(lab.directory, options, Path(scratch) / "purified")
    inverted, known, adaptive = result.report.triggers
    summary = result.report.summary
    return Row(
        seed=seed,
        threads=threads,
        lab_ca=evaluation.ca,
        asr_before=known.asr_before,
        asr_after=known.asr_after,
        ca_before=float(summary.ca_before or 0),
        ca_after=float(summary.ca_after or 0),
        inverted_after=inverted.asr_after,
        adaptive_after=adaptive.asr_after,
        verdict=result.verdict,
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    raise SystemExit(main())
