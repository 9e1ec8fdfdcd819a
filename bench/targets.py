"""How easily a small trigger reaches each class, and whether the backdoor's target stands out.

Runs the class-wise targeted search (``worker/cbpt/reach.py``) on the tuning half of each lab
model's shots, as a job would, under the zero-shot head, and prints per model and seed: the
class reached most easily and whether it is the implanted target; the verdict's margin (the log
of the runner-up's cross-entropy over the best's); for comparison, Neural Cleanse's anomaly
index of the best class's log cross-entropy after the warm-up ("z early") and the implanted
target's rank then (it must be within ``keep`` to go on); the classes with the highest flip
rates; and the seconds taken. A backdoor's target should lead by a wide margin, and the clean
twin's best class by a narrow one.

    .venv/bin/python bench/targets.py --lab var/bench/broad-glyphs \\
        [--models clean,badnets,blended] [--search '{"budget": 0.01, "keep": 0}'] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cbpt.evaluation import stratified_split
from worker.cbpt.reach import Reach, ReachSearch, reach_every_class
from worker.lab.folder import open_lab_folder

_ALL = "clean,badnets,blended,sig,wanet,label-consistent,optimized-patch"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lab", type=Path, default=Path("var/bench/broad-glyphs"))
    parser.add_argument("--models", default=_ALL)
    parser.add_argument("--search", default="{}", help="ReachSearch fields as JSON")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--holdout", type=float, default=0.5, help="share held out, as a job")
    parser.add_argument("--top", type=int, default=4)
    args = parser.parse_args()
    overrides = json.loads(args.search)
    console = Console(width=200)
    table = Table(title=f"class-wise targeted search {overrides or 'defaults'} ({args.lab})")
    columns = ("model", "seed", "target", "best", "right", "margin", "z early", "early rank")
    columns += ("top classes: flip / cross-entropy / mask", "s")
    for column in columns:
        table.add_column(column, justify="left" if column[0] in "mbrt" else "right")
    for model_name in [m for m in args.models.split(",") if m]:
        directory = args.lab / model_name
        if not directory.is_dir():
            console.print(f"[yellow]{directory} missing, skipped")
            continue
        lab = open_lab_folder(directory)
        names = lab.class_names
        target = lab.attack.target if lab.attack is not None else "-"
        shots = lab.shot_tensors()
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            tune, _ = stratified_split(shots.labels, args.holdout, seed)
            search = ReachSearch(**{"seed": seed, **overrides})
            started = time.perf_counter()
            reach = reach_every_class(
                lab.model,
                lab.normalizer,
                shots.pixels[tune],
                shots.labels[tune],
                lab.hand,
                lab.logit_scale,
                search,
            )
            seconds = time.perf_counter() - started
            best = reach.best
            order = torch.argsort(reach.flip, descending=True, stable=True)[: args.top].tolist()
            top = ", ".join(
                f"{names[k]} {float(reach.flip[k]):.2f}/{float(reach.loss[k]):.2f}"
                f"/{float(reach.mask[k]):.3f}"
                for k in order
            )
            table.add_row(
                model_name,
                str(seed),
                target,
                names[best],
                "yes" if names[best] == target else "no",
                f"{reach.margin(best):.2f}",
                f"{_anomaly_index(-reach.early_loss.clamp_min(1e-6).log(), best):.1f}",
                _early_rank(reach, names, target),
                top,
                f"{seconds:.0f}",
            )
            console.print(f"{model_name} seed {seed}: {top} ({seconds:.0f} s)")
    console.print(table)
    return 0


def _anomaly_index(values: torch.Tensor, index: int) -> float:
    """Neural Cleanse's anomaly index of ``values[index]``: its distance from the other values'
    median in their median absolute deviations (as a normal's sigma). Read on the log
    cross-entropies after the warm-up, when every class had the same steps, it is the
    comparison the verdict's margin was chosen over (docs/engine.md)."""
    others = [float(v) for k, v in enumerate(values.tolist()) if k != index]
    median = statistics.median(others)
    spread = statistics.median(abs(v - median) for v in others) * 1.4826
    return (float(values[index]) - median) / max(spread, 1e-3)


def _early_rank(reach: Reach, names: tuple[str, ...], target: str) -> str:
    """The implanted target's rank by cross-entropy after the warm-up (1: the easiest)."""
    if target not in names:
        return "-"
    order = torch.argsort(reach.early_loss).tolist()
    return str(order.index(names.index(target)) + 1)


if __name__ == "__main__":
    raise SystemExit(main())
