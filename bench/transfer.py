"""Where stage 1's inverted trigger moves image features, against where the real trigger does.

Prompt tuning sees the real trigger only through the inverted one, so what it learns transfers
as far as the two move the features alike. For each backdoored lab model this runs stage 1 as a
job does (default settings, the 16 shots, the verdict's score as the judge) and measures on the
test images of the other classes, with ``d = f(T(x)) - f(x)`` each image's feature shift
(features L2-normalised) and ``u`` the unit mean of the inverted trigger's shifts:

- ``cos(means)``: the cosine of the mean shifts, real against inverted;
- ``cos(images)``: the mean cosine of each image's two shifts;
- ``along u``: the mean shift along ``u``, real and inverted, and their ratio: how much further
  the real trigger pushes along the direction tuning learns to undo;
- ``share along u``: the share of the real shift's energy along ``u``.

A ratio above 1 is why ``tuning.shift_scales`` extrapolates the inverted shift (docs/engine.md).
The table also names the class stage 1 suspects (the real target or not), its flip rate and its
mask. ``--options`` runs stage 1 with other settings, e.g. ``'{"inversion": {"success_loss":
0.05}}'``.

    .venv/bin/python bench/transfer.py [--lab var/bench/lab] [--attacks badnets,wanet] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.nn.functional as F  # noqa: N812 - the conventional alias
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cbpt.attacks import ATTACK_NAMES
from worker.cbpt.options import PurifyOptions
from worker.cbpt.verdict import detect
from worker.cbpt.zeroshot import encode_images
from worker.lab.folder import LabFolder, NotBackdooredError, backdoored_folders, open_lab_folder


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lab", type=Path, default=Path("var/bench/lab"))
    parser.add_argument("--attacks", default=",".join(ATTACK_NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="{}", help="PurifyOptions as JSON for stage 1")
    args = parser.parse_args()
    options = PurifyOptions.model_validate({**json.loads(args.options), "seed": args.seed})
    console = Console(width=160)
    table = Table(title=f"feature shift of the real trigger against stage 1's (seed {args.seed})")
    columns = (
        "model",
        "suspected",
        "flip",
        "mask",
        "score",
        "cos(means)",
        "cos(images)",
        "along u: real",
        "inverted",
        "ratio",
        "share along u",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    try:
        folders = backdoored_folders(args.lab, args.attacks)
    except NotBackdooredError as exc:
        console.print(str(exc))
        return 1
    for name, folder in folders:
        table.add_row(name, *_shift_row(open_lab_folder(folder), options))
        console.print(f"{name} measured")
    console.print(table)
    return 0


def _shift_row(lab: LabFolder, options: PurifyOptions) -> list[str]:
    model, normalizer, test = lab.model, lab.normalizer, lab.test
    spec, target = lab.backdoor()
    detection = detect(lab.clip, lab.hand, lab.shot_tensors(), options)
    trigger = detection.trigger
    others = test.images[test.labels != target]
    clean = encode_images(model, others, normalizer)
    real = encode_images(model, others, normalizer, transform=spec.apply) - clean
    inverted = encode_images(model, others, normalizer, transform=trigger.apply) - clean
    direction = F.normalize(inverted.mean(0), dim=0)
    real_along, inverted_along = (
        float((real @ direction).mean()),
        float((inverted @ direction).mean()),
    )
    return [
        lab.class_names[detection.target],
        f"{detection.flip_rate:.3f}",
        f"{trigger.mask_fraction:.4f}",
        f"{detection.score:.1f}",
        f"{float(direction @ F.normalize(real.mean(0), dim=0)):.3f}",
        f"{float(F.cosine_similarity(real, inverted).mean()):.3f}",
        f"{real_along:.3f}",
        f"{inverted_along:.3f}",
        f"{real_along / inverted_along:.2f}",
        f"{float((real @ direction).square().sum() / real.square().sum()):.3f}",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
