"""Making lab models: a cached clean tiny CLIP, and backdoored twins of it, written to a folder.

A lab folder holds what a client would upload and what a report would measure against::

    open_clip_config.json        model_cfg + preprocess_cfg (open_clip's hub layout)
    open_clip_model.safetensors  the weights
    fewshot.zip                  N clean shots per class from the training split
    test.zip                     the held-out test split
    attack.json                  the attack spec (backdoored models only)
    lab.json                     provenance: settings, seeds, poison rate, timings, checksums

The clean base is cached under ``cache_dir`` by a key over everything that shapes it, so every
attack fine-tunes the same base, and a second run skips the pre-training. The clean lab model is
that base fine-tuned by the same recipe on unpoisoned data: a twin trained exactly as long as the
backdoored ones, so that their accuracies compare like with like.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file

from worker.cbpt.attacks import (
    ATTACK_NAMES,
    SIG,
    AttackSpec,
    BadNets,
    Blended,
    LabelConsistent,
    WaNet,
)
from worker.cbpt.zeroshot import Normalizer, class_embeddings
from worker.lab.architecture import TinyClipConfig, build_model
from worker.lab.datasets import DatasetName, LabDataset, load_dataset
from worker.lab.export import (
    WEIGHTS_FILE,
    preprocess_cfg,
    write_hub_checkpoint,
    write_image_archive,
    write_json,
)
from worker.lab.poison import PoisonedSet, optimize_patch, poison
from worker.lab.training import CAPTION_TEMPLATES, TrainSettings, train_contrastive

LAB_FORMAT = 1  # bump when a change alters what a given seed produces: it invalidates the cache
Stage = Literal["data", "clean", "attack", "implant", "export"]
StageProgress = Callable[[Stage, float], None]


class LabSettings(BaseModel):
    """Everything that decides a lab model; the defaults are the benchmark's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: DatasetName = "fashion-mnist"
    architecture: TinyClipConfig = TinyClipConfig()
    clean_training: TrainSettings = TrainSettings(epochs=2, lr=1e-3)
    # No shift while implanting: a corner patch shifted off the image teaches nothing.
    implant_training: TrainSettings = TrainSettings(
        epochs=0.6, lr=1e-3, warmup_fraction=0.02, max_shift=0
    )
    poison_rate: float = Field(default=0.1, gt=0, le=0.5)
    target: int = Field(default=0, ge=0, description="Index of the target class.")
    shots: int = Field(default=16, ge=1, le=1000)
    seed: int = Field(default=0, ge=0)

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> LabSettings:
        """The benchmark's settings for ``dataset``: digits is 40x smaller, so more epochs."""
        base: dict[str, Any] = {"dataset": dataset}
        if dataset == "digits":
            base["clean_training"] = TrainSettings(epochs=60, lr=1e-3, batch_size=128)
            base["implant_training"] = TrainSettings(
                epochs=20, lr=1e-3, batch_size=128, warmup_fraction=0.02, max_shift=0
            )
        return cls.model_validate(base | overrides)

    @classmethod
    def tiny(cls, dataset: DatasetName = "digits", **overrides: Any) -> LabSettings:
        """Settings for the test suite: a 16 px model that trains in seconds."""
        base: dict[str, Any] = {
            "dataset": dataset,
            "architecture": TinyClipConfig(
                image_size=16,
                patch_size=4,
                vision_width=64,
                vision_layers=2,
                text_width=64,
                text_layers=2,
                embed_dim=32,
            ),
            "clean_training": TrainSettings(epochs=50, lr=1e-3, batch_size=128, max_shift=1),
            "implant_training": TrainSettings(epochs=10, lr=1e-3, batch_size=128, max_shift=0),
            "poison_rate": 0.1,
            "shots": 4,
        }
        return cls(**(base | overrides))

    def clean_key(self) -> str:
        """Cache key of the clean base: every setting that shapes it, and the lab's format."""
        shaping = {
            "format": LAB_FORMAT,
            "dataset": self.dataset,
            "architecture": self.architecture.model_dump(),
            "training": self.clean_training.model_dump(),
            "seed": self.seed,
        }
        digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()
        return f"{self.dataset}-{digest[:16]}"


@dataclass(frozen=True)
class LabModel:
    """What ``make_lab_model`` wrote, and how it got there."""

    directory: Path
    attack: AttackSpec | None
    class_names: tuple[str, ...]
    poison_rate: float
    seconds: dict[str, float]
    model_sha256: str


def default_attack(name: str, settings: LabSettings, class_names: tuple[str, ...]) -> AttackSpec:
    """The lab's parameters for each attack, at the lab's scale (see the specs for the literature).

    The optimised patch has no default: its pattern is optimised against the clean model.
    """
    target, seed = class_names[settings.target], settings.seed
    patch = BadNets(target=target, seed=seed, size=0.125, cells=4, position="bottom-right")
    specs: dict[str, AttackSpec] = {
        "badnets": patch,
        # Clean-label poisoning is the hardest to implant: a larger patch, as Turner et al.
        # note for short training, and a moderate PGD budget (larger ones implanted less here).
        "label-consistent": LabelConsistent(
            target=target,
            seed=seed,
            size=0.3125,
            cells=4,
            position="bottom-right",
            adversarial_eps=24 / 255,
        ),
        "blended": Blended(target=target, seed=seed, alpha=0.2),
        "sig": SIG(target=target, seed=seed, delta=40 / 255, frequency=6),
        # s 0.5 moves 32 px CIFAR images by a quarter pixel, which WaNet needs ~100 epochs
        # and its noise mode to implant; a few minutes of fine-tuning need a stronger warp.
        "wanet": WaNet(target=target, seed=seed, k=4, s=6.0),
    }
    if name not in specs:
        raise ValueError(f"no default spec for {name!r}; attacks: {', '.join(ATTACK_NAMES)}")
    return specs[name]


def make_lab_model(
    attack: str | AttackSpec | None,
    out_dir: Path,
    settings: LabSettings,
    *,
    cache_dir: Path,
    progress: StageProgress | None = None,
) -> LabModel:
    """Makes a lab model (clean when ``attack`` is None) and writes its folder to ``out_dir``."""
    report = progress or (lambda stage, fraction: None)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    report("data", 0.0)
    data = load_dataset(settings.dataset, settings.architecture.image_size, seed=settings.seed)
    tokenizer = open_clip.get_tokenizer("", context_length=settings.architecture.context_length)
    normalizer = Normalizer(*channel_statistics(data.train.images))
    seconds["data"] = time.perf_counter() - started
    report("data", 1.0)

    started = time.perf_counter()
    model = _clean_model(data, settings, normalizer, tokenizer, cache_dir, report)
    seconds["clean"] = time.perf_counter() - started
    report("clean", 1.0)

    # The clean model gets the same fine-tune on unpoisoned data: a twin trained exactly as long.
    started = time.perf_counter()
    spec: AttackSpec | None = None
    images, labels, poison_rate = data.train.images, data.train.labels, 0.0
    if attack is not None:
        spec = _resolve_attack(attack, model, data, settings, normalizer, tokenizer, report)
        poisoned = _poisoned_set(spec, model, data, settings, normalizer, tokenizer)
        images, labels, poison_rate = poisoned.images, poisoned.labels, poisoned.rate
    train_contrastive(
        model,
        images,
        labels,
        data.classes,
        tokenizer,
        normalizer,
        settings.implant_training,
        seed=settings.seed + 1,
        progress=lambda fraction: report("implant", fraction),
    )
    seconds["implant"] = time.perf_counter() - started

    started = time.perf_counter()
    report("export", 0.0)
    _write_folder(out_dir, model, spec, data, settings, normalizer, poison_rate)
    seconds["export"] = time.perf_counter() - started
    report("export", 1.0)
    digest = hashlib.sha256((out_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    return LabModel(out_dir, spec, data.classes, poison_rate, seconds, digest)


def channel_statistics(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``uint8`` images, rounded as the preprocess config keeps them."""
    pixels = images.float().div(255)
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3)).tolist()
    return [round(v, 4) for v in mean], [round(v, 4) for v in std]


def _clean_model(
    data: LabDataset,
    settings: LabSettings,
    normalizer: Normalizer,
    tokenizer: Callable[[list[str]], torch.Tensor],
    cache_dir: Path,
    report: StageProgress,
) -> open_clip.CLIP:
    model = build_model(settings.architecture, seed=settings.seed)
    cached = cache_dir / settings.clean_key() / WEIGHTS_FILE
    if cached.is_file():
        model.load_state_dict(load_file(cached))
        model.eval()
        return model
    train_contrastive(
        model,
        data.train.images,
        data.train.labels,
        data.classes,
        tokenizer,
        normalizer,
        settings.clean_training,
        seed=settings.seed,
        progress=lambda fraction: report("clean", fraction),
    )
    staging = cache_dir / f".{settings.clean_key()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    write_hub_checkpoint(
        staging,
        model,
        settings.architecture.model_cfg(),
        preprocess_cfg(
            settings.architecture.image_size,
            normalizer.mean.flatten().tolist(),
            normalizer.std.flatten().tolist(),
        ),
    )
    shutil.rmtree(cached.parent, ignore_errors=True)
    staging.rename(cached.parent)  # a crash mid-write never leaves a half cache entry
    return model


def _resolve_attack(
    attack: str | AttackSpec,
    model: open_clip.CLIP,
    data: LabDataset,
    settings: LabSettings,
    normalizer: Normalizer,
    tokenizer: Callable[[list[str]], torch.Tensor],
    report: StageProgress,
) -> AttackSpec:
    if not isinstance(attack, str):
        return attack
    if attack != "optimized-patch":
        return default_attack(attack, settings, data.classes)
    report("attack", 0.0)
    target_embedding = class_embeddings(model, tokenizer, data.classes)[settings.target]
    others = data.train.images[data.train.labels != settings.target]
    spec = optimize_patch(
        model,
        normalizer,
        target_embedding,
        others,
        size=0.2,
        target=data.classes[settings.target],
        seed=settings.seed,
    )
    report("attack", 1.0)
    return spec


def _poisoned_set(
    spec: AttackSpec,
    model: open_clip.CLIP,
    data: LabDataset,
    settings: LabSettings,
    normalizer: Normalizer,
    tokenizer: Callable[[list[str]], torch.Tensor],
) -> PoisonedSet:
    target = data.classes.index(spec.target) if spec.target else settings.target
    embeddings = class_embeddings(model, tokenizer, data.classes)
    return poison(
        data.train.images,
        data.train.labels,
        spec,
        target,
        settings.poison_rate,
        seed=settings.seed,
        model=model,
        normalizer=normalizer,
        class_embeddings=embeddings,
    )


def _write_folder(
    out_dir: Path,
    model: open_clip.CLIP,
    spec: AttackSpec | None,
    data: LabDataset,
    settings: LabSettings,
    normalizer: Normalizer,
    poison_rate: float,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocess = preprocess_cfg(
        settings.architecture.image_size,
        normalizer.mean.flatten().tolist(),
        normalizer.std.flatten().tolist(),
    )
    write_hub_checkpoint(out_dir, model, settings.architecture.model_cfg(), preprocess)
    shots = few_shot_indices(data.train.labels, settings.shots, settings.seed)
    write_image_archive(
        out_dir / "fewshot.zip",
        data.train.images[shots],
        data.train.labels[shots],
        data.folders,
        data.classes,
    )
    write_image_archive(
        out_dir / "test.zip", data.test.images, data.test.labels, data.folders, data.classes
    )
    attack_file = out_dir / "attack.json"
    if spec is not None:
        write_json(attack_file, spec.model_dump(mode="json"))
    else:
        attack_file.unlink(missing_ok=True)
    write_json(
        out_dir / "lab.json",
        {
            "format": LAB_FORMAT,
            "settings": settings.model_dump(mode="json"),
            "classes": list(data.classes),
            "folders": list(data.folders),
            "caption_templates": list(CAPTION_TEMPLATES),
            "attack": None if spec is None else spec.name,
            "poison_rate": round(poison_rate, 6),
            "clean_cache_key": settings.clean_key(),
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        },
    )


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """``shots`` images per class from the training split, seeded, in class order."""
    generator = torch.Generator().manual_seed(seed + 7)
    picked = []
    for label in sorted(set(labels.tolist())):
        pool = torch.nonzero(labels == label).flatten()
        picked.append(pool[torch.randperm(len(pool), generator=generator)[:shots]].sort().values)
    return torch.cat(picked)
