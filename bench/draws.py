"""Stage 1's draws, every one of them: what the verdict's thresholds are calibrated from.

One inversion from a random start is a draw, and the verdict reads the best of a job's draws.
A job stops at the first draw that reaches ``backdoored_score``, so its report shows only the
draws that ran, and a backdoor's reported score is often just over the threshold. This runs
``--draws`` of them for every seed with no early stop, on the 16 shots of each lab folder (as
``bench/efficacy.py``'s jobs, which tune on every shot), and prints each draw's suspected
target, flip rate, mask and score, then per model the range over seeds of the best draw (the
verdict's score) and, for comparison, of the draws' mean. The thresholds belong in the gap
between the clean models' highest best draw and the backdoored models' lowest:

    .venv/bin/python bench/draws.py [--lab var/bench/lab] [--attacks clean,label-consistent] \\
        [--seeds 0,1,2] [--draws 3]

For another family of checkpoints, make a lab folder of each known-clean and known-backdoored
model (``open_clip_model.safetensors``, ``fewshot.zip``, ``test.zip``, and ``attack.json`` with
the real target, none for a clean model) and point ``--lab`` at them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cbpt.inversion import Judge, Trigger, flip_statistics, invert_trigger
from worker.cbpt.options import InversionSettings, VerdictSettings
from worker.cbpt.verdict import detection_strength
from worker.lab.folder import LabFolder, open_lab_folder


@dataclass(frozen=True)
class Draw:
    """One inversion as the verdict judges it; ``score`` is 0 where its gates call it clean."""

    target: str
    flip_rate: float
    mask_fraction: float
    score: float


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lab", type=Path, default=Path("var/bench/lab"))
    parser.add_argument("--attacks", default="clean,label-consistent")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("var/bench/draws.json"))
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    names = [name for name in args.attacks.split(",") if name]
    missing = [n for n in names if not (args.lab / n / "open_clip_model.safetensors").is_file()]
    if missing or args.draws < 1 or not seeds:
        parser.error(f"no lab model for {missing} under {args.lab}" if missing else "empty run")
    console = Console(width=160)
    verdict = VerdictSettings()
    runs: list[tuple[str, int, list[Draw]]] = []
    for name in names:
        lab = open_lab_folder(args.lab / name)
        for seed in seeds:
            draws = _draws(lab, seed, args.draws, verdict)
            runs.append((name, seed, draws))
            console.print(f"{name} seed {seed}: {', '.join(f'{d.score:.1f}' for d in draws)}")

    table = Table(title=f"every draw ({args.draws} per seed, no early stop)")
    for column in ("model", "seed", "draw", "target", "flip rate", "mask", "score"):
        table.add_column(column, justify="left" if column in ("model", "target") else "right")
    for name, seed, draws in runs:
        for index, draw in enumerate(draws):
            table.add_row(
                name,
                str(seed),
                str(index),
                draw.target,
                f"{draw.flip_rate:.3f}",
                f"{draw.mask_fraction:.4f}",
                f"{draw.score:.1f}",
            )
    console.print(table)

    summary = Table(title="per model, over the seeds: the best draw (the verdict's) and the mean")
    for column in ("model", "seeds", "best draw: min", "max", "mean of draws: min", "max"):
        summary.add_column(column, justify="left" if column == "model" else "right")
    for name in names:
        per_seed = [draws for model, _, draws in runs if model == name]
        means = [statistics.fmean(d.score for d in draws) for draws in per_seed]
        bests = [max(d.score for d in draws) for draws in per_seed]
        summary.add_row(
            name,
            str(len(per_seed)),
            f"{min(bests):.1f}",
            f"{max(bests):.1f}",
            f"{min(means):.1f}",
            f"{max(means):.1f}",
        )
    console.print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = [
        {"model": name, "seed": seed, "draws": [asdict(d) for d in draws]}
        for name, seed, draws in runs
    ]
    args.out.write_text(json.dumps(records, indent=2) + "\n")
    return 0


def _draws(lab: LabFolder, seed: int, count: int, verdict: VerdictSettings) -> list[Draw]:
    """Every draw of one seed, seeded as a job's restarts are, each judged as a job judges it."""
    pixels = lab.shots.images.float() / 255
    draws: list[Draw] = []

    def judge(trigger: Trigger) -> float:
        target, flip = flip_statistics(
            lab.model, lab.normalizer, lab.hand, pixels, lab.shots.labels, trigger
        )
        strength = detection_strength(flip, trigger.mask_fraction, verdict)
        draws.append(Draw(lab.class_names[target], flip, trigger.mask_fraction, strength))
        return strength

    settings = InversionSettings(restarts=count)
    invert_trigger(lab.model, lab.normalizer, pixels, settings, seed=seed, judge=Judge(judge))
    return draws


if __name__ == "__main__":
    raise SystemExit(main())
