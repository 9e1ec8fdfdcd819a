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

    .venv/bin/python bench/transfer.py [--lab var/bench/lab] [--attacks badnets,wanet] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cbpt.attacks import ATTACK_NAMES, parse_attack
from worker.cbpt.checkpoint import load_checkpoint
from worker.cbpt.imagesets import read_image_set
from worker.cbpt.inversion import InversionSettings
from worker.cbpt.purify import VerdictSettings, invert_for_verdict
from worker.cbpt.zeroshot import DEFAULT_TEMPLATES, Normalizer, class_embeddings, encode_images


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lab", type=Path, default=Path("var/bench/lab"))
    parser.add_argument("--attacks", default=",".join(ATTACK_NAMES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(width=160)
    table = Table(title=f"feature shift of the real trigger against stage 1's (seed {args.seed})")
    columns = (
        "model",
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
    for name in [a for a in args.attacks.split(",") if a]:
        folder = args.lab / name
        if not (folder / "attack.json").is_file():
            console.print(f"{folder} holds no backdoored lab model; run bench/lab.py first")
            return 1
        table.add_row(name, *_shift_row(folder, args.seed))
        console.print(f"{name} measured")
    console.print(table)
    return 0


def _shift_row(folder: Path, seed: int) -> list[str]:
    loaded = load_checkpoint(folder, device=torch.device("cpu"))
    model, preprocess = loaded.model, loaded.preprocess
    normalizer = Normalizer(preprocess.mean, preprocess.std)
    size, interpolation = preprocess.size, preprocess.interpolation
    shots = read_image_set(folder / "fewshot.zip", size, interpolation=interpolation)
    test = read_image_set(folder / "test.zip", size, interpolation=interpolation)
    hand = class_embeddings(model, loaded.tokenizer, shots.class_names, DEFAULT_TEMPLATES)
    inversion = invert_for_verdict(
        model,
        normalizer,
        hand,
        shots.images.float() / 255,
        shots.labels,
        InversionSettings(),
        VerdictSettings(),
        seed=seed,
    )
    spec = parse_attack((folder / "attack.json").read_bytes())
    others = test.images[test.labels != shots.class_names.index(spec.target or "")]
    clean = encode_images(model, others, normalizer)
    real = encode_images(model, others, normalizer, transform=spec.apply) - clean
    inverted = encode_images(model, others, normalizer, transform=inversion.trigger.apply) - clean
    direction = F.normalize(inverted.mean(0), dim=0)
    real_along, inverted_along = (
        float((real @ direction).mean()),
        float((inverted @ direction).mean()),
    )
    return [
        f"{max(inversion.strengths):.1f}",
        f"{float(direction @ F.normalize(real.mean(0), dim=0)):.3f}",
        f"{float(F.cosine_similarity(real, inverted).mean()):.3f}",
        f"{real_along:.3f}",
        f"{inverted_along:.3f}",
        f"{real_along / inverted_along:.2f}",
        f"{float((real @ direction).square().sum() / real.square().sum()):.3f}",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
