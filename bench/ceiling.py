"""What any class-embedding head can do on a lab model: the bound on text-side purification.

CBPT ships a ``(C, D)`` matrix of class embeddings and nothing else: a deployed model classifies
by the cosine of its image feature with each row. Whatever the prompts, the inversion or the
losses, purification can therefore do no better than the best such matrix. This benchmark fits
that matrix directly, with full knowledge of the *real* trigger, and asks whether the issue's
targets (ASR after <= 1%, CA after >= zero-shot CA) are within reach of any head at all:

- ``16 shots``: fitted on the lab's few shots, what a job has (inversion perfect);
- ``half``: fitted on half of the test set (about 500 images a class), measured on the other;
- ``same``: fitted and measured on the same half: no generalisation gap, the bound of bounds.

Each fit minimises the cross-entropy of clean images and of their triggered versions against
the true class, ``CE(clean) + w * CE(triggered)``, over a sweep of ``w``, with the checkpoint's
logit scale. The "best" column is the point of the frontier with the lowest ASR whose CA is not
below zero-shot; "-" where no point keeps CA.

"floor" is the share of the other classes' *clean* images that zero-shot already sends to the
target: ASR counts these natural confusions too, so a purification that made triggered images
behave exactly like clean ones would still measure about that much.

Where ``--lab`` holds the clean twin (``clean/``), a second table measures every attack's real
trigger on it, under zero-shot and under a head fitted on its 16 shots with clean
cross-entropy alone (``w=0``): what the trigger does to a model that was never poisoned, the
floor the backdoored models' ASR after is to be read against.

    .venv/bin/python bench/ceiling.py [--lab var/bench/lab] [--attacks badnets,wanet]
    .venv/bin/python bench/ceiling.py --lab var/bench/broad-glyphs   # the broad family
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cbpt.attacks import ATTACK_NAMES, AttackSpec
from worker.cbpt.evaluation import stratified_split
from worker.cbpt.metrics import attack_success_rate, clean_accuracy, predictions
from worker.cbpt.zeroshot import encode_images
from worker.lab.folder import LabFolder, NotBackdooredError, backdoored_folders, open_lab_folder

WEIGHTS = (0.0, 0.25, 1.0, 4.0, 16.0)


@dataclass(frozen=True)
class Features:
    clean: torch.Tensor
    triggered: torch.Tensor
    labels: torch.Tensor

    def subset(self, index: torch.Tensor) -> Features:
        return Features(self.clean[index], self.triggered[index], self.labels[index])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lab", type=Path, default=Path("var/bench/lab"))
    parser.add_argument("--attacks", default=",".join(ATTACK_NAMES))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(width=200)
    table = Table(title="best class-embedding head with the real trigger (CA / ASR, test set)")
    columns = ("model", "zero-shot", "floor", "fit on", *(f"w={w:g}" for w in WEIGHTS), "best")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "fit on") else "right")
    try:
        folders = backdoored_folders(args.lab, args.attacks)
    except NotBackdooredError as exc:
        console.print(str(exc))
        return 1
    specs: dict[str, AttackSpec] = {}
    for name, folder in folders:
        lab = open_lab_folder(folder)
        spec, target = lab.backdoor()
        specs[name] = spec
        shots, test = _features(lab, spec)
        scale, hand = lab.logit_scale, lab.hand
        half, other = stratified_split(test.labels, 0.5, args.seed)
        before = _measure(hand, test.subset(other), target)
        floor = _natural_confusion(hand, test.subset(other), target)
        fits = {
            "16 shots": (shots, test.subset(other)),
            "half": (test.subset(half), test.subset(other)),
            "same": (test.subset(other), test.subset(other)),
        }
        for label, (train, measure_on) in fits.items():
            points = [
                _measure(_fit(hand, train, scale, w, args.steps), measure_on, target)
                for w in WEIGHTS
            ]
            keeping = [p for p in points if p[0] >= before[0]]
            best = min(keeping, key=lambda p: p[1]) if keeping else None
            table.add_row(
                name if label == "16 shots" else "",
                _pair(before) if label == "16 shots" else "",
                f"{floor:.3f}" if label == "16 shots" else "",
                label,
                *(_pair(p) for p in points),
                _pair(best) if best else "-",
            )
    console.print(table)
    if (args.lab / "clean" / "open_clip_model.safetensors").is_file():
        console.print(_clean_twin(args.lab / "clean", specs, args.steps))
    return 0


def _clean_twin(clean: Path, specs: dict[str, AttackSpec], steps: int) -> Table:
    """Each attack's real trigger on the clean twin: zero-shot, and under a 16-shot clean head."""
    lab = open_lab_folder(clean)
    table = Table(title="the clean twin under each real trigger (CA / ASR, test set)")
    for column in ("trigger", "zero-shot", "16-shot head (clean CE)"):
        table.add_column(column, justify="left" if column == "trigger" else "right")
    for name, spec in specs.items():
        target = lab.class_names.index(spec.target or "")
        shots, test = _features(lab, spec)
        head = _fit(lab.hand, shots, lab.logit_scale, 0.0, steps)
        table.add_row(
            name, _pair(_measure(lab.hand, test, target)), _pair(_measure(head, test, target))
        )
    return table


def _features(lab: LabFolder, spec: AttackSpec) -> tuple[Features, Features]:
    """Clean and triggered features of the shots and of the test set, under ``spec``."""
    shots, test = (
        Features(
            encode_images(lab.model, images.images, lab.normalizer),
            encode_images(lab.model, images.images, lab.normalizer, transform=spec.apply),
            images.labels,
        )
        for images in (lab.shots, lab.test)
    )
    return shots, test


def _fit(
    hand: torch.Tensor, data: Features, scale: float, weight: float, steps: int
) -> torch.Tensor:
    """The class embeddings that minimise the two cross-entropies, started from zero-shot."""
    rows = torch.nn.Parameter(hand.clone())
    optimizer = torch.optim.Adam([rows], lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        head = F.normalize(rows, dim=1)
        loss = F.cross_entropy(scale * data.clean @ head.T, data.labels)
        if weight:
            loss = loss + weight * F.cross_entropy(scale * data.triggered @ head.T, data.labels)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
    return F.normalize(rows.detach(), dim=1)


def _measure(head: torch.Tensor, data: Features, target: int) -> tuple[float, float]:
    return (
        clean_accuracy(predictions(data.clean, head), data.labels),
        attack_success_rate(predictions(data.triggered, head), data.labels, target),
    )


def _natural_confusion(head: torch.Tensor, data: Features, target: int) -> float:
    """The "ASR" of no trigger at all: other classes' clean images classified as the target."""
    return attack_success_rate(predictions(data.clean, head), data.labels, target)


def _pair(point: tuple[float, float]) -> str:
    return f"{point[0]:.3f} / {point[1]:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
