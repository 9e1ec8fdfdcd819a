"""Speed benchmark: stage timings of a whole job, and stage 2 with cached vs recomputed features.

Stage 2 runs only the text tower per step because image features of clean and triggered images
do not change while prompts are tuned. This measures one epoch (one pass over the tuning
images) both ways in the same run. Targets: cached >= 10x faster; a whole job on a lab model
<= 60 s on 2 CPU cores.

    .venv/bin/python bench/speed.py [--lab var/bench/lab/badnets] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cbpt.attacks import parse_attack
from worker.cbpt.checkpoint import load_checkpoint
from worker.cbpt.imagesets import read_image_set
from worker.cbpt.prompts import ClassPrompts, encode_prompts
from worker.cbpt.purify import PurifyOptions, purify
from worker.cbpt.zeroshot import Normalizer, encode_images
from worker.lab.datasets import default_dataset
from worker.lab.make import LabSettings, make_lab_model


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lab", type=Path, default=Path("var/bench/lab/badnets"))
    parser.add_argument("--cache", type=Path, default=Path("var/lab-cache"))
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    if not (args.lab / "open_clip_model.safetensors").is_file():
        settings = LabSettings.for_dataset(default_dataset())
        make_lab_model("badnets", args.lab, settings, cache_dir=args.cache)
    console = Console(width=132)

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        result = purify(
            args.lab,
            args.lab / "fewshot.zip",
            PurifyOptions(device="cpu"),
            out_dir=Path(scratch),
            known_triggers=(parse_attack((args.lab / "attack.json").read_bytes()),),
        )
        whole = time.perf_counter() - started
    stages = Table(title=f"whole job on {args.lab} (16 shots, split 50/50): {whole:.1f} s")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    for stage, seconds in result.report["timings_s"].items():
        stages.add_row(stage, f"{seconds:.2f}")
    console.print(stages)

    cached, recomputed = _stage_two_epochs(args.lab, args.epochs)
    table = Table(title=f"stage 2, seconds per epoch (mean of {args.epochs})")
    for column in ("image features", "s / epoch", "speed-up"):
        table.add_column(column, justify="right")
    table.add_row("recomputed every step", f"{recomputed:.4f}", "1.0x")
    table.add_row("cached once", f"{cached:.4f}", f"{recomputed / cached:.1f}x")
    console.print(table)
    return 0


def _stage_two_epochs(lab: Path, epochs: int) -> tuple[float, float]:
    """One epoch = one full-batch step over the tuning images, clean and triggered views."""
    loaded = load_checkpoint(lab)
    model = loaded.model
    normalizer = Normalizer(loaded.preprocess.mean, loaded.preprocess.std)
    shots = read_image_set(lab / "fewshot.zip", loaded.preprocess.size)
    pixels = shots.images.float() / 255
    trigger = parse_attack((lab / "attack.json").read_bytes())
    prompts = ClassPrompts(model, loaded.tokenizer, shots.class_names)
    optimizer = torch.optim.Adam(prompts.parameters(), lr=5e-3)
    scale = model.logit_scale.exp().detach()
    labels = torch.cat([shots.labels, shots.labels])

    def step(features: torch.Tensor) -> None:
        text = encode_prompts(model, prompts(), prompts.tokens)
        loss = F.cross_entropy(scale * features @ text.T, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    def features_now() -> torch.Tensor:
        clean = encode_images(model, pixels, normalizer)
        triggered = encode_images(model, pixels, normalizer, transform=trigger.apply)
        return torch.cat([clean, triggered])

    cache = features_now()
    started = time.perf_counter()
    for _ in range(epochs):
        step(cache)
    cached = (time.perf_counter() - started) / epochs
    started = time.perf_counter()
    for _ in range(epochs):
        step(features_now())
    recomputed = (time.perf_counter() - started) / epochs
    return cached, recomputed


if __name__ == "__main__":
    raise SystemExit(main())
