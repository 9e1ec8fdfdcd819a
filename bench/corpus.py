"""How much of the broad corpus a small CLIP learns, by corpus settings: a quick lab for the lab.

The broad family's base takes a quarter of an hour; whether a corpus teaches subjects at all
shows in a minute or two on a 16 px tiny CLIP. For each ``--iconic`` share this generates a
corpus (``--pairs``, seed 0), pretrains a tiny CLIP on it for ``--epochs``, and prints:

- subject accuracy on 1,000 fresh pairs of the same corpus settings (seed 1), zero-shot over
  the 52 shapes, letters and digits with "a photo of a {}.";
- colour and background accuracy on the same pairs (what the towers learn first);
- zero-shot CA on the ``glyphs`` task (36 classes, held-out faces, ink on paper).

    .venv/bin/python bench/corpus.py [--iconic 0,0.5,0.8,1] [--epochs 20] [--pairs 8000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import open_clip
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cbpt.zeroshot import Normalizer, class_embeddings, encode_images
from worker.lab.architecture import build_model
from worker.lab.broad.concepts import BACKGROUNDS, COLOURS, DIGITS, LETTERS, SHAPES
from worker.lab.broad.corpus import CorpusSettings, build_corpus, load_sources, scene_of
from worker.lab.broad.make import BroadSettings
from worker.lab.broad.tasks import Task, load_task
from worker.lab.training import TrainSettings, train_captioned

ARCHITECTURE = BroadSettings.tiny().architecture  # the test preset's 16 px CLIP
SIZE = ARCHITECTURE.image_size


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--iconic", default="0,0.5,0.8,1")
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--pairs", type=int, default=8000)
    parser.add_argument("--cache", type=Path, default=Path("var/bench/corpus-cache"))
    args = parser.parse_args()
    console = Console(width=120)
    task = load_task("glyphs", SIZE, shots=1, test_per_class=20, seed=0)
    table = Table(title=f"tiny CLIP, {SIZE} px, {args.pairs} pairs, {args.epochs} epochs")
    for column in ("iconic share", "subject", "colour", "background", "glyphs CA", "train s"):
        table.add_column(column, justify="right")
    for share in [float(value) for value in args.iconic.split(",") if value]:
        settings = CorpusSettings(
            pairs=args.pairs, image_size=SIZE, with_fashion=False, iconic_fraction=share
        )
        row = _measure(settings, args.epochs, args.cache, task)
        console.print(f"iconic {share}: {row}")
        table.add_row(f"{share:.2f}", *row)
    console.print(table)
    return 0


def _measure(settings: CorpusSettings, epochs: float, cache: Path, task: Task) -> tuple[str, ...]:
    corpus = build_corpus(settings, cache)
    model = build_model(ARCHITECTURE, seed=0)
    tokenizer = open_clip.get_tokenizer("", context_length=ARCHITECTURE.context_length)
    normalizer = Normalizer([0.5] * 3, [0.25] * 3)
    started = time.perf_counter()
    train = TrainSettings(epochs=epochs, lr=2e-3, batch_size=128, max_shift=0)
    train_captioned(model, corpus.images, corpus.captions, tokenizer, normalizer, train, seed=0)
    seconds = time.perf_counter() - started

    fresh_settings = settings.model_copy(update={"pairs": 1000, "seed": 1})
    fresh = build_corpus(fresh_settings, cache)
    sources = load_sources(with_fashion=False)
    scenes = [scene_of(index, fresh_settings, sources) for index in range(len(fresh))]
    features = encode_images(model, fresh.images, normalizer)

    def accuracy(names: list[str], truth: list[str], template: str) -> float:
        head = class_embeddings(model, tokenizer, names, (template,))
        labels = torch.tensor([names.index(value) for value in truth])
        return float(((features @ head.T).argmax(dim=1) == labels).float().mean())

    subjects = [*SHAPES, *LETTERS, *DIGITS]
    subject = accuracy(subjects, [s.subject for s in scenes], "a photo of a {}.")
    colour = accuracy(list(COLOURS), [s.colour for s in scenes], "a {} thing.")
    background = accuracy(
        list(BACKGROUNDS), [s.background for s in scenes], "something on a {} background."
    )
    head = class_embeddings(model, tokenizer, list(task.classes))
    task_features = encode_images(model, task.test.images, normalizer)
    ca = float(((task_features @ head.T).argmax(dim=1) == task.test.labels).float().mean())
    return (*(f"{v:.3f}" for v in (subject, colour, background, ca)), f"{seconds:.0f}")


if __name__ == "__main__":
    raise SystemExit(main())
