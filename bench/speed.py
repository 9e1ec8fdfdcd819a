"""Speed benchmark: stage timings of a whole job, and stage 2 with cached vs recomputed features.

Stage 2 runs only the text tower per step because image features of clean and triggered images
do not change while prompts are tuned. This measures one epoch (one pass over the tuning
images) both ways in the same run. Targets: cached >= 10x faster; a whole job on a lab model
<= 60 s on 2 CPU cores.

    .venv/bin/python bench/speed.py [--lab var/bench/lab/badnets] [--epochs 20]

``--arch`` times a job on a real open_clip architecture instead, with random weights (none can
be downloaded here, and speed does not depend on them) and 16 digits shots per class resized to
its input size. Target: ViT-B-32, 10 classes x 16 shots, a whole job <= 60 s on one GPU:

    python bench/speed.py --arch ViT-B-32 --device cuda [--precision bf16] [--jobs 2]

A process's first job pays for CUDA's start-up (kernels, cuBLAS handles); ``--jobs 2`` shows
what a warm worker takes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F  # noqa: N812
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cbpt.attacks import AttackSpec, BadNets, parse_attack
from worker.cbpt.checkpoint import load_checkpoint
from worker.cbpt.imagesets import read_image_set
from worker.cbpt.options import PurifyOptions, Runtime
from worker.cbpt.precision import Precision, autocast
from worker.cbpt.prompts import ClassPrompts, encode_prompts
from worker.cbpt.purify import Inputs, purify
from worker.cbpt.zeroshot import Normalizer, encode_images
from worker.lab.datasets import default_dataset, load_dataset
from worker.lab.export import preprocess_cfg, write_hub_checkpoint, write_image_archive, write_json
from worker.lab.make import LabSettings, few_shot_indices, make_lab_model


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lab", type=Path, default=Path("var/bench/lab/badnets"))
    parser.add_argument("--cache", type=Path, default=Path("var/lab-cache"))
    parser.add_argument(
        "--arch", help="an open_clip model name: time it with random weights instead of --lab"
    )
    parser.add_argument("--shots", type=int, default=16, help="per class, with --arch")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--options", default="{}", help="JSON merged into the job's options")
    parser.add_argument("--jobs", type=int, default=1, help="whole jobs in a row, one process")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    if args.jobs < 1 or args.epochs < 1:
        parser.error("--jobs and --epochs must be at least 1")
    console = Console(width=132)
    options = PurifyOptions.model_validate(json.loads(args.options))
    runtime_choice = Runtime(args.device, args.precision)

    with tempfile.TemporaryDirectory() as scratch:
        if args.arch:
            subject = Path(scratch) / "subject"
            _random_subject(args.arch, subject, args.shots)
            title = f"{args.arch}, random weights, 10 classes x {args.shots} shots"
        else:
            subject = args.lab
            if not (subject / "open_clip_model.safetensors").is_file():
                settings = LabSettings.for_dataset(default_dataset())
                make_lab_model("badnets", subject, settings, cache_dir=args.cache)
            title = f"{subject}, 16 shots"
        trigger = parse_attack((subject / "attack.json").read_bytes())
        for job in range(1, args.jobs + 1):
            started = time.perf_counter()
            result = purify(
                Inputs(subject, subject / "fewshot.zip", known_triggers=(trigger,)),
                options,
                out_dir=Path(scratch) / f"out-{job}",
                runtime=runtime_choice,
            )
            whole = time.perf_counter() - started
            runtime = result.report.runtime
            console.print(
                f"job {job}: {title}, split 50/50, {runtime['device']} "
                f"{runtime['precision']}: whole job {whole:.1f} s"
            )
            stages = Table()
            stages.add_column("stage")
            stages.add_column("seconds", justify="right")
            for stage, seconds in result.report.timings_s.items():
                stages.add_row(stage, f"{seconds:.2f}")
            console.print(stages)
        summary = result.report.summary
        console.print(
            f"verdict {result.verdict}, CA {summary.ca_before:.3f} -> {summary.ca_after:.3f}"
        )

        device = torch.device(runtime["device"])
        precision: Precision = "bf16" if runtime["precision"] == "bf16" else "fp32"
        cached, recomputed = _stage_two_epochs(subject, trigger, args.epochs, device, precision)
    table = Table(title=f"stage 2, seconds per epoch (median of {args.epochs})")
    for column in ("image features", "s / epoch", "speed-up"):
        table.add_column(column, justify="right")
    table.add_row("recomputed every step", f"{recomputed:.4f}", "1.0x")
    table.add_row("cached once", f"{cached:.4f}", f"{recomputed / cached:.1f}x")
    console.print(table)
    return 0


def _random_subject(arch: str, directory: Path, shots: int) -> None:
    """A hub folder of ``arch`` with random weights, digits shots at its size, a BadNets spec."""
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else int(size)
    preprocess = preprocess_cfg(size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    write_hub_checkpoint(directory, model, open_clip.get_model_config(arch), preprocess)
    digits = load_dataset("digits", size)
    index = few_shot_indices(digits.train.labels, shots, seed=0)
    write_image_archive(
        directory / "fewshot.zip",
        digits.train.images[index],
        digits.train.labels[index],
        digits.folders,
        digits.classes,
    )
    spec = BadNets(target=digits.classes[0], seed=0, size=0.125, cells=4)
    write_json(directory / "attack.json", spec.model_dump(mode="json"))


def _stage_two_epochs(
    subject: Path, trigger: AttackSpec, epochs: int, device: torch.device, precision: Precision
) -> tuple[float, float]:
    """One epoch = one full-batch step over the tuning images, clean and triggered views.

    Only the checkpoint and the shots are read, decoded as a job decodes them: a lab folder's
    test split and zero-shot head (``open_lab_folder``) would be work this timing never uses.
    """
    loaded = load_checkpoint(subject, device=device)
    model, preprocess = loaded.model, loaded.preprocess
    normalizer = Normalizer(preprocess.mean, preprocess.std)
    shots = read_image_set(
        subject / "fewshot.zip", preprocess.size, interpolation=preprocess.interpolation
    )
    pixels = (shots.images.float() / 255).to(device)
    prompts = ClassPrompts(model, loaded.tokenizer, shots.class_names).to(device)
    optimizer = torch.optim.Adam(prompts.parameters(), lr=5e-3)
    scale = model.logit_scale.exp().detach()
    labels = torch.cat([shots.labels, shots.labels]).to(device)

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

    def seconds_per_epoch(features: Callable[[], torch.Tensor]) -> float:
        step(features())  # warm-up: allocations and kernel choice are not the epoch's cost
        _synchronize(device)
        seconds = []
        for _ in range(epochs):
            started = time.perf_counter()
            step(features())
            _synchronize(device)
            seconds.append(time.perf_counter() - started)
        # A cached epoch takes milliseconds, so one scheduler hiccup moves a mean by tens of
        # percent; the median is the epoch's cost.
        return statistics.median(seconds)

    with autocast(device, precision):
        cache = features_now()
        cached = seconds_per_epoch(lambda: cache)
        recomputed = seconds_per_epoch(features_now)
    return cached, recomputed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    raise SystemExit(main())
