"""Benchmark of the backdoor lab: the clean tiny CLIP and one backdoored twin per attack.

Prints one row per model: zero-shot CA ("a photo of a {}."), ASR of its trigger, the same
trigger's ASR on the clean model (what the backdoor adds), the poison rate and the time taken to
make it (the clean row: pre-training, unless cached; attack rows: poisoning and fine-tuning).
Targets: clean CA >= 0.70; every attack ASR >= 0.90 with CA within 3 points of the clean model;
each backdoored model made in <= 180 s; the same seed gives the same bytes (``--determinism``).

    .venv/bin/python bench/lab.py [--dataset fashion-mnist] [--attacks badnets,sig] [--determinism]

``--family broad [--task glyphs|fashion]`` makes the broad family's models instead (pretrained
on captioned scenes, poisoned through captions, measured on the downstream task), under
``--out``/broad-TASK; ``--settings`` then overrides BroadSettings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cbpt.attacks import ATTACK_NAMES
from worker.lab.datasets import default_dataset
from worker.lab.evaluate import evaluate_lab_dir
from worker.lab.make import LabModel, LabSettings, make_lab_model

OUT = Path("var/bench/lab")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dataset", default=default_dataset())
    parser.add_argument("--attacks", default=",".join(ATTACK_NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=Path("var/lab-cache"))
    parser.add_argument("--determinism", action="store_true", help="make the first attack twice")
    parser.add_argument(
        "--settings",
        default="{}",
        help='LabSettings as JSON over the defaults, e.g. \'{"architecture": {"embed_dim": 128}}\'',
    )
    parser.add_argument("--family", choices=("classic", "broad"), default="classic")
    parser.add_argument("--task", default="glyphs", help="the broad family's downstream task")
    args = parser.parse_args()
    overrides = json.loads(args.settings)
    make, title, out = _maker(args, overrides)
    console = Console(width=132)
    rows = []

    started = time.perf_counter()
    clean = make(None, "clean")
    clean_seconds = time.perf_counter() - started
    clean_eval = evaluate_lab_dir(clean.directory)
    rows.append(
        {
            "attack": "clean",
            "ca": clean_eval.ca,
            "asr": None,
            "asr_clean_model": None,
            "poison_rate": 0.0,
            "seconds": clean_seconds,
            "sha256": clean.model_sha256,
        }
    )

    for name in [a for a in args.attacks.split(",") if a]:
        started = time.perf_counter()
        made = make(name, name)
        seconds = time.perf_counter() - started
        result = evaluate_lab_dir(made.directory)
        on_clean = evaluate_lab_dir(clean.directory, attack=made.attack)
        rows.append(
            {
                "attack": name,
                "ca": result.ca,
                "asr": result.asr,
                "asr_clean_model": on_clean.asr,
                "poison_rate": made.poison_rate,
                "seconds": seconds,
                "sha256": made.model_sha256,
            }
        )
        console.print(f"{name}: CA {result.ca:.3f} ASR {result.asr:.3f} in {seconds:.0f} s")

    table = Table(title=f"lab models: {title}, seed {args.seed}")
    for column in (
        "attack",
        "CA",
        "ASR",
        "ASR on clean model",
        "poison rate",
        "make (s)",
        "sha256",
    ):
        table.add_column(column, justify="left" if column in ("attack", "sha256") else "right")
    for row in rows:
        table.add_row(
            row["attack"],
            f"{row['ca']:.3f}",
            _fraction(row["asr"]),
            _fraction(row["asr_clean_model"]),
            f"{row['poison_rate']:.3f}",
            f"{row['seconds']:.0f}",
            row["sha256"][:12],
        )
    console.print(table)

    if args.determinism and len(rows) > 1:
        name = rows[1]["attack"]
        again = make(name, f"{name}-again")
        same = again.model_sha256 == rows[1]["sha256"]
        console.print(f"determinism: {name} made twice -> {'same' if same else 'DIFFERENT'} bytes")
        shutil.rmtree(again.directory)
        if not same:
            return 1
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _maker(
    args: argparse.Namespace, overrides: dict[str, Any]
) -> tuple[Callable[[str | None, str], LabModel], str, Path]:
    """``make(attack, folder name)`` for the chosen family, the table's title, and the folder
    the models go to."""
    if args.family == "broad":
        from worker.lab.broad.make import BroadSettings, make_broad_model

        broad = BroadSettings.model_validate({"task": args.task, "seed": args.seed, **overrides})
        out = args.out.parent / f"broad-{args.task}" if args.out == OUT else args.out

        def make_broad(attack: str | None, folder: str) -> LabModel:
            return make_broad_model(attack, out / folder, broad, cache_dir=args.cache)

        return make_broad, f"broad family, {args.task} task", out
    settings = LabSettings.model_validate({"dataset": args.dataset, "seed": args.seed, **overrides})

    def make_classic(attack: str | None, folder: str) -> LabModel:
        return make_lab_model(attack, args.out / folder, settings, cache_dir=args.cache)

    return make_classic, args.dataset, args.out


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
