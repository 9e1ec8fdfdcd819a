"""How easily each class can be reached: targeted trigger search, class by class.

Stage 1 inverts a trigger with no target label and names the class it sends images to. On a
model with strong natural universal patches, that class need not be the backdoor's. This probe
asks the question Neural Cleanse asks, one class at a time: for target ``k``, re-invert a
mask-and-pattern trigger under the zero-shot head with cross-entropy towards ``k`` and the
mask's mean held to ``--budget`` (``rounds.invert_against_head``, as the rounds do), then print
the share of the other classes' shots it sends to ``k``, its mask, and their ratio. A backdoor's
target should stand out from the other classes of its model, and from the same class of the
clean twin.

    .venv/bin/python bench/targets.py --lab var/bench/broad-glyphs --models clean,badnets \\
        [--classes star,"letter N",cross] [--budget 0.01] [--steps 100] [--batch 16]

Without ``--classes``, every class is probed (the cost is linear in them: about 6 s a class at
the defaults on the broad family's 36 classes, on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cbpt.options import InversionSettings
from worker.cbpt.rounds import Head, Reinversion, invert_against_head, success_under_head
from worker.lab.folder import open_lab_folder


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lab", type=Path, default=Path("var/bench/broad-glyphs"))
    parser.add_argument("--models", default="clean,badnets")
    parser.add_argument("--classes", default="", help="comma-separated; all when empty")
    parser.add_argument("--budget", type=float, default=0.01, help="mean mask held under this")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(width=160)
    table = Table(
        title=f"targeted search per class: budget {args.budget}, {args.steps} steps, "
        f"batch {args.batch}, seed {args.seed}"
    )
    for column in ("model", "class", "flip", "mask", "flip / mask", "robust z", "s"):
        table.add_column(column, justify="left" if column in ("model", "class") else "right")
    for model_name in [m for m in args.models.split(",") if m]:
        lab = open_lab_folder(args.lab / model_name)
        names = lab.class_names
        probed = [c for c in args.classes.split(",") if c] or list(names)
        shots = lab.shot_tensors()
        rows = []
        for name in probed:
            target = names.index(name)
            victims = shots.pixels[shots.labels != target]
            head = Head(lab.hand, target, lab.logit_scale)
            started = time.perf_counter()
            trigger = invert_against_head(
                lab.model,
                lab.normalizer,
                victims,
                head,
                Reinversion(
                    InversionSettings(batch_size=args.batch),
                    steps=args.steps,
                    budget=args.budget,
                    seed=args.seed,
                ),
            )
            flip = success_under_head(lab.model, lab.normalizer, victims, head, trigger)
            seconds = time.perf_counter() - started
            rows.append((name, flip, trigger.mask_fraction, seconds))
            console.print(f"{model_name} {name}: flip {flip:.3f} mask {trigger.mask_fraction:.4f}")
        ratios = [flip / max(mask, 1e-6) for _, flip, mask, _ in rows]
        median = statistics.median(ratios)
        spread = statistics.median(abs(r - median) for r in ratios) * 1.4826 or 1e-9
        for (name, flip, mask, seconds), ratio in zip(rows, ratios, strict=True):
            table.add_row(
                model_name,
                name,
                f"{flip:.3f}",
                f"{mask:.4f}",
                f"{ratio:.1f}",
                f"{(ratio - median) / spread:.2f}",
                f"{seconds:.0f}",
            )
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
