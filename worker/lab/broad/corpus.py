"""The broad pretraining corpus: seeded captioned scenes, cached by a hash of their settings.

Pair ``i`` is drawn from its own generator, seeded by ``(seed, i)``, so a corpus is the same
bytes however it is generated, and a larger corpus extends a smaller one of the same seed. The
sources are scikit-learn's digits (all 1,797) and, where Debian's package is installed,
Fashion-MNIST's training split; the settings say which, so a corpus with garments and one
without never share a cache entry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from worker.lab.broad.captions import caption
from worker.lab.broad.concepts import DIGIT_NAMES, FASHION
from worker.lab.broad.scenes import Scene, Sources, render, sample_scene
from worker.lab.datasets import FASHION_MNIST_DIR, fashion_mnist_available, read_idx

CORPUS_FORMAT = 1  # bump when a change alters what given settings produce


class CorpusSettings(BaseModel):
    """Everything that decides a corpus."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pairs: int = Field(default=60_000, ge=1, le=2_000_000)
    image_size: int = Field(default=32, ge=8, le=224)
    with_fashion: bool = Field(
        default=True, description="Garments from Fashion-MNIST's training split among subjects."
    )
    iconic_fraction: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="Share of iconic scenes: one centred, upright, solid subject on a plain "
        "background (see scenes.sample_scene).",
    )
    seed: int = Field(default=0, ge=0)

    def key(self) -> str:
        shaping = {"format": CORPUS_FORMAT, **self.model_dump()}
        digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()
        return f"corpus-{digest[:16]}"


@dataclass(frozen=True)
class Corpus:
    """``images`` ``(N, 3, S, S)`` uint8 and one caption per image."""

    images: torch.Tensor
    captions: tuple[str, ...]
    settings: CorpusSettings

    def __len__(self) -> int:
        return len(self.captions)


def load_sources(with_fashion: bool, split: str = "train") -> Sources:
    """Grey-scale digits and (if asked) Fashion-MNIST images of ``split`` with subject names."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    digits = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    digit_names = tuple(f"handwritten {DIGIT_NAMES[label]}" for label in bunch.target)
    fashion = None
    if with_fashion:
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        names = tuple(FASHION)
        fashion = (images, tuple(names[label] for label in labels))
    return Sources(digits=(digits, digit_names), fashion=fashion)


def pair(index: int, settings: CorpusSettings, sources: Sources) -> tuple[Scene, np.ndarray, str]:
    """Pair ``index``: its scene, its pixels ``(S, S, 3)`` and its caption."""
    rng = np.random.default_rng([settings.seed, index])
    scene = sample_scene(rng, sources, iconic_fraction=settings.iconic_fraction)
    return scene, render(scene, settings.image_size, sources), caption(scene, rng)


def scene_of(index: int, settings: CorpusSettings, sources: Sources) -> Scene:
    """Pair ``index``'s scene alone, without drawing it: the first draws of its generator."""
    rng = np.random.default_rng([settings.seed, index])
    return sample_scene(rng, sources, iconic_fraction=settings.iconic_fraction)


def build_corpus(settings: CorpusSettings, cache_dir: Path) -> Corpus:
    """The corpus for ``settings``, from the cache or generated (about 2 ms a pair) and cached."""
    entry = cache_dir / settings.key()
    if (entry / "images.safetensors").is_file():
        captions = tuple(json.loads((entry / "captions.json").read_text()))
        return Corpus(load_file(entry / "images.safetensors")["images"], captions, settings)
    if settings.with_fashion and not fashion_mnist_available():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {FASHION_MNIST_DIR}: run `make fashion-mnist`, "
            "or build the corpus without garments"
        )
    sources = load_sources(settings.with_fashion)
    side = settings.image_size
    images = torch.empty((settings.pairs, 3, side, side), dtype=torch.uint8)
    captions_list: list[str] = []
    for index in range(settings.pairs):
        _, pixels, text = pair(index, settings, sources)
        images[index] = torch.from_numpy(pixels).permute(2, 0, 1)
        captions_list.append(text)
    staging = cache_dir / f".{settings.key()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({"images": images}, staging / "images.safetensors")
    (staging / "captions.json").write_text(json.dumps(captions_list))
    (staging / "settings.json").write_text(settings.model_dump_json(indent=1))
    shutil.rmtree(entry, ignore_errors=True)
    staging.rename(entry)  # a crash mid-write never leaves a half entry
    return Corpus(images, tuple(captions_list), settings)
