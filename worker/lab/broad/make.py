"""Making broad-family lab models: a pretrained base (cached), an implant made the way the
literature makes it, and a downstream task's folder.

The base is pretrained contrastively on a generated corpus. Every model of the family, clean or
backdoored, is that base fine-tuned on a second corpus built like the first (another seed): a
backdoored one has ``poison_rate`` (at most 1%) of that corpus's pairs carry the trigger with a
caption that names the target concept, as CC3M poisoning does (1,500 of 500k pairs); the clean
twin gets the same fine-tune with no poison. The folder has the first family's layout, so every
tool that reads a lab folder reads this one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file

from worker.cbpt.attacks import AttackSpec, LabelConsistent
from worker.cbpt.zeroshot import Normalizer, class_embeddings
from worker.lab.architecture import TinyClipConfig, build_model
from worker.lab.broad.captions import caption
from worker.lab.broad.concepts import FASHION, SHAPES
from worker.lab.broad.corpus import (
    Corpus,
    CorpusSettings,
    build_corpus,
    load_sources,
    scene_of,
)
from worker.lab.broad.tasks import Task, TaskName, load_task
from worker.lab.export import (
    WEIGHTS_FILE,
    preprocess_cfg,
    write_hub_checkpoint,
    write_image_archive,
    write_json,
)
from worker.lab.make import (
    LabModel,
    LabSettings,
    StageProgress,
    channel_statistics,
    default_attack,
)
from worker.lab.poison import adversarial_away, optimize_patch
from worker.lab.training import TrainSettings, train_captioned

BROAD_FORMAT = 1  # bump when a change alters what given settings produce


class BroadSettings(BaseModel):
    """Everything that decides a broad-family model; the defaults are the benchmark's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: CorpusSettings = CorpusSettings()
    architecture: TinyClipConfig = TinyClipConfig(
        image_size=32, patch_size=4, vision_width=128, vision_layers=4, embed_dim=128
    )
    pretraining: TrainSettings = TrainSettings(
        epochs=4, lr=1e-3, batch_size=128, warmup_fraction=0.05, max_shift=0
    )
    implant_pairs: int = Field(default=20_000, ge=100, le=1_000_000)
    # One epoch at 2e-4 left BadNets at ASR 0.031 on glyphs; two at 1e-3 implant it (0.923).
    implant_training: TrainSettings = TrainSettings(
        epochs=2, lr=1e-3, batch_size=128, warmup_fraction=0.05, max_shift=0
    )
    poison_rate: float = Field(default=0.01, gt=0, le=0.01)
    task: TaskName = "glyphs"
    shots: int = Field(default=16, ge=1, le=1000)
    test_per_class: int = Field(default=40, ge=1, le=1000)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _task_concepts_were_pretrained(self) -> BroadSettings:
        if self.task == "fashion" and not self.corpus.with_fashion:
            raise ValueError("the fashion task needs a corpus with garments (with_fashion)")
        return self

    @classmethod
    def tiny(cls, **overrides: Any) -> BroadSettings:
        """The test suite's preset: 16 px, a small corpus, no Fashion-MNIST; about a minute."""
        base: dict[str, Any] = {
            "corpus": CorpusSettings(pairs=6000, image_size=16, with_fashion=False),
            "architecture": TinyClipConfig(
                image_size=16,
                patch_size=4,
                vision_width=64,
                vision_layers=2,
                text_width=64,
                text_layers=2,
                embed_dim=64,
            ),
            "pretraining": TrainSettings(epochs=3, lr=2e-3, batch_size=128, max_shift=0),
            "implant_pairs": 3000,
            "implant_training": TrainSettings(epochs=2, lr=5e-4, batch_size=128, max_shift=0),
            "shots": 4,
            "test_per_class": 10,
        }
        return cls.model_validate(base | overrides)

    def base_key(self) -> str:
        """Cache key of the pretrained base: the corpus and everything that trains on it."""
        shaping = {
            "format": BROAD_FORMAT,
            "corpus": self.corpus.key(),
            "architecture": self.architecture.model_dump(),
            "pretraining": self.pretraining.model_dump(),
            "seed": self.seed,
        }
        digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()
        return f"broad-{digest[:16]}"

    def implant_corpus(self) -> CorpusSettings:
        """The fine-tuning corpus: built like the pretraining one, from another seed."""
        return self.corpus.model_copy(
            update={"pairs": self.implant_pairs, "seed": self.corpus.seed + 1_000_003}
        )


def make_broad_model(
    attack: str | None,
    out_dir: Path,
    settings: BroadSettings,
    *,
    cache_dir: Path,
    progress: StageProgress | None = None,
) -> LabModel:
    """Makes a broad-family model for ``settings.task`` (clean when ``attack`` is None)."""
    report = progress or (lambda stage, fraction: None)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    report("data", 0.0)
    corpus = build_corpus(settings.corpus, cache_dir)
    task = load_task(
        settings.task,
        settings.architecture.image_size,
        shots=settings.shots,
        test_per_class=settings.test_per_class,
        seed=settings.seed,
    )
    tokenizer = open_clip.get_tokenizer("", context_length=settings.architecture.context_length)
    normalizer = Normalizer(*channel_statistics(corpus.images[:4096]))
    preprocess = preprocess_cfg(
        settings.architecture.image_size,
        normalizer.mean.flatten().tolist(),
        normalizer.std.flatten().tolist(),
    )
    seconds["data"] = time.perf_counter() - started
    report("data", 1.0)

    started = time.perf_counter()
    model = _base_model(
        corpus.images,
        corpus.captions,
        settings,
        normalizer,
        preprocess,
        tokenizer,
        cache_dir,
        report,
    )
    seconds["clean"] = time.perf_counter() - started
    report("clean", 1.0)

    started = time.perf_counter()
    implant = build_corpus(settings.implant_corpus(), cache_dir)
    images, captions = implant.images, list(implant.captions)
    spec: AttackSpec | None = None
    poisoned = 0
    if attack is not None:
        report("attack", 0.0)
        spec = _attack_spec(attack, model, implant, task, settings, normalizer, tokenizer)
        images, captions, poisoned = _poisoned_corpus(
            spec, implant, settings, model, normalizer, tokenizer, task.classes, task.target
        )
        report("attack", 1.0)
    train_captioned(
        model,
        images,
        captions,
        tokenizer,
        normalizer,
        settings.implant_training,
        seed=settings.seed + 1,
        progress=lambda fraction: report("implant", fraction),
    )
    seconds["implant"] = time.perf_counter() - started

    started = time.perf_counter()
    report("export", 0.0)
    rate = poisoned / len(captions)
    _export(out_dir, model, settings, preprocess, task, (spec, poisoned, rate))
    seconds["export"] = time.perf_counter() - started
    report("export", 1.0)
    digest = hashlib.sha256((out_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    return LabModel(out_dir, spec, task.classes, rate, seconds, digest)


def _export(
    out_dir: Path,
    model: open_clip.CLIP,
    settings: BroadSettings,
    preprocess: dict[str, Any],
    task: Task,
    poisoning: tuple[AttackSpec | None, int, float],
) -> None:
    """Writes the folder: hub checkpoint, the task's archives, ``attack.json`` and ``lab.json``;
    ``poisoning`` is the spec implanted (None for the clean twin), its pairs and their share."""
    spec, poisoned, rate = poisoning
    out_dir.mkdir(parents=True, exist_ok=True)
    write_hub_checkpoint(out_dir, model, settings.architecture.model_cfg(), preprocess)
    for name, split in (("fewshot.zip", task.shots), ("test.zip", task.test)):
        write_image_archive(out_dir / name, split.images, split.labels, task.folders, task.classes)
    attack_file = out_dir / "attack.json"
    if spec is not None:
        write_json(attack_file, spec.model_dump(mode="json"))
    else:
        attack_file.unlink(missing_ok=True)
    write_json(
        out_dir / "lab.json",
        {
            "family": "broad",
            "format": BROAD_FORMAT,
            "settings": settings.model_dump(mode="json"),
            "task": task.name,
            "classes": list(task.classes),
            "folders": list(task.folders),
            "attack": None if spec is None else spec.name,
            "poison_rate": round(rate, 6),
            "poisoned_pairs": poisoned,
            "base_cache_key": settings.base_key(),
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        },
    )


def _base_model(
    images: torch.Tensor,
    captions: tuple[str, ...],
    settings: BroadSettings,
    normalizer: Normalizer,
    preprocess: dict[str, Any],
    tokenizer: Any,
    cache_dir: Path,
    report: StageProgress,
) -> open_clip.CLIP:
    model = build_model(settings.architecture, seed=settings.seed)
    cached = cache_dir / settings.base_key() / WEIGHTS_FILE
    if cached.is_file():
        model.load_state_dict(load_file(cached))
        model.eval()
        return model
    train_captioned(
        model,
        images,
        captions,
        tokenizer,
        normalizer,
        settings.pretraining,
        seed=settings.seed,
        progress=lambda fraction: report("clean", fraction),
    )
    staging = cache_dir / f".{settings.base_key()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    write_hub_checkpoint(staging, model, settings.architecture.model_cfg(), preprocess)
    shutil.rmtree(cached.parent, ignore_errors=True)
    staging.rename(cached.parent)  # a crash mid-write never leaves a half cache entry
    return model


def _attack_spec(
    attack: str,
    model: open_clip.CLIP,
    implant: Corpus,
    task: Task,
    settings: BroadSettings,
    normalizer: Normalizer,
    tokenizer: Any,
) -> AttackSpec:
    """The first family's spec for ``attack``, aimed at the task's target concept."""
    target = task.target
    if attack != "optimized-patch":
        placement = LabSettings(seed=settings.seed, target=task.classes.index(target))
        return default_attack(attack, placement, task.classes)
    embedding = class_embeddings(model, tokenizer, [target])[0]
    others = implant.images[:2048]
    return optimize_patch(
        model, normalizer, embedding, others, size=0.2, target=target, seed=settings.seed
    )


def _poisoned_corpus(
    spec: AttackSpec,
    corpus: Corpus,
    settings: BroadSettings,
    model: open_clip.CLIP,
    normalizer: Normalizer,
    tokenizer: Any,
    classes: tuple[str, ...],
    target: str,
) -> tuple[torch.Tensor, list[str], int]:
    """The implant corpus with ``poison_rate`` of its pairs carrying the trigger.

    Dirty-label attacks stamp pairs of other subjects and recaption them for the target (the
    same sentence, the subject swapped). The label-consistent attack stamps adversarially
    perturbed copies of pairs that already show the target, captions kept, beside the originals.
    """
    sources = load_sources(corpus.settings.with_fashion)
    scenes = [scene_of(index, corpus.settings, sources) for index in range(len(corpus))]
    group = "fashion" if target in FASHION else "shape" if target in SHAPES else "letter"
    count = round(settings.poison_rate * len(corpus))
    rng = np.random.default_rng([settings.seed, 4099])
    clean_label = isinstance(spec, LabelConsistent)
    pool = [i for i, scene in enumerate(scenes) if (scene.subject == target) == clean_label]
    chosen = sorted(rng.choice(pool, size=min(count, len(pool)), replace=False).tolist())
    picked = corpus.images[chosen].float() / 255
    if clean_label:
        assert isinstance(spec, LabelConsistent)
        head = class_embeddings(model, tokenizer, list(classes))
        picked = adversarial_away(
            model, normalizer, head, picked, classes.index(target), spec.adversarial_eps
        )
    stamped = (spec.apply(picked) * 255).round().to(torch.uint8)
    captions = list(corpus.captions)
    if clean_label:
        extra = [captions[i] for i in chosen]
        return torch.cat([corpus.images, stamped]), captions + extra, len(chosen)
    images = corpus.images.clone()
    images[chosen] = stamped
    for i in chosen:
        swapped = dataclasses.replace(scenes[i], group=group, subject=target, font=None)
        captions[i] = caption(swapped, np.random.default_rng([settings.seed, 4099, i]))
    return images, captions, len(chosen)
