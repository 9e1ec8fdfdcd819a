"""The broad lab family: a deterministic corpus free of zero-shot prompts, tasks, implants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from worker.cbpt.attacks import BadNets
from worker.cbpt.zeroshot import Normalizer
from worker.lab.architecture import build_model
from worker.lab.broad.captions import caption, is_zero_shot_prompt
from worker.lab.broad.concepts import SUBJECT_GROUPS, concept_count
from worker.lab.broad.corpus import CorpusSettings, build_corpus, load_sources, pair, scene_of
from worker.lab.broad.make import BroadSettings, _poisoned_corpus, make_broad_model
from worker.lab.broad.scenes import sample_scene
from worker.lab.broad.tasks import GLYPH_SHAPES, load_task
from worker.lab.evaluate import evaluate_lab_dir
from worker.lab.training import CAPTION_TEMPLATES, TrainSettings

SMALL = CorpusSettings(pairs=48, image_size=16, with_fashion=False, seed=3)


def test_the_corpus_is_the_same_bytes_from_any_cache(tmp_path: Path) -> None:
    first = build_corpus(SMALL, tmp_path / "a")
    again = build_corpus(SMALL, tmp_path / "b")
    assert torch.equal(first.images, again.images)
    assert first.captions == again.captions
    cached = build_corpus(SMALL, tmp_path / "a")  # read back from the cache
    assert torch.equal(cached.images, first.images)
    assert cached.captions == first.captions
    # Pair i depends on (seed, i) alone: a longer corpus extends a shorter one.
    longer = build_corpus(SMALL.model_copy(update={"pairs": 64}), tmp_path / "c")
    assert torch.equal(longer.images[:48], first.images)
    assert longer.captions[:48] == first.captions
    sources = load_sources(with_fashion=False)
    assert [scene_of(i, SMALL, sources) for i in range(8)] == [
        pair(i, SMALL, sources)[0] for i in range(8)
    ]
    other = build_corpus(SMALL.model_copy(update={"seed": 4}), tmp_path / "d")
    assert other.captions != first.captions
    assert first.images.shape == (48, 3, 16, 16)


def test_no_caption_is_a_zero_shot_prompt() -> None:
    sources = load_sources(with_fashion=False)
    settings = SMALL.model_copy(update={"pairs": 2000})
    captions = [pair(index, settings, sources)[2] for index in range(2000)]
    assert not [text for text in captions if is_zero_shot_prompt(text)]
    # The check itself bites: the prompts the lab and open_clip score with are caught.
    for template in (*CAPTION_TEMPLATES, "a bad photo of the {}.", "a {} in a video game."):
        assert is_zero_shot_prompt(template.format("star")), template
    # Captions name several attributes, in many shapes of sentence.
    assert len(set(captions)) > 0.95 * len(captions)
    assert sum(len(text.split()) for text in captions) / len(captions) > 6


def test_captions_name_the_subject_with_one_of_its_words() -> None:
    sources = load_sources(with_fashion=False)
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng, sources)
        text = caption(scene, rng)
        words = SUBJECT_GROUPS[scene.group][scene.subject]
        assert any(word in text for word in words), (scene.subject, text)


def test_the_corpus_covers_a_hundred_concepts() -> None:
    assert concept_count(with_fashion=True) >= 100
    sources = load_sources(with_fashion=False)
    rng = np.random.default_rng(1)
    subjects = {sample_scene(rng, sources).subject for _ in range(3000)}
    assert len(subjects) == 16 + 26 + 10  # every shape, letter and digit appears


def test_the_glyph_task_is_drawn_from_held_out_fonts_and_is_deterministic() -> None:
    task = load_task("glyphs", 16, shots=2, test_per_class=3, seed=0)
    assert len(task.classes) == 36
    assert task.target in task.classes
    assert set(GLYPH_SHAPES) < set(task.classes)
    assert task.shots.images.shape == (72, 3, 16, 16)
    assert len(task.test) == 108
    assert torch.bincount(task.test.labels).tolist() == [3] * 36
    again = load_task("glyphs", 16, shots=2, test_per_class=3, seed=0)
    assert torch.equal(again.test.images, task.test.images)
    assert not torch.equal(task.shots.images, task.test.images[: len(task.shots)])


def test_a_fashion_task_needs_fashion_in_pretraining() -> None:
    with pytest.raises(ValueError, match="garments"):
        BroadSettings.tiny(task="fashion")


MICRO = {
    "corpus": CorpusSettings(pairs=600, image_size=16, with_fashion=False),
    "pretraining": TrainSettings(epochs=1, lr=1e-3, batch_size=64, max_shift=0),
    "implant_pairs": 500,
    "implant_training": TrainSettings(epochs=1, lr=1e-3, batch_size=64, max_shift=0),
    "shots": 2,
    "test_per_class": 2,
}


def test_a_broad_folder_has_the_lab_layout_and_loads_with_plain_open_clip(tmp_path: Path) -> None:
    settings = BroadSettings.tiny(**MICRO)
    made = make_broad_model("badnets", tmp_path / "badnets", settings, cache_dir=tmp_path / "c")
    names = {path.name for path in made.directory.iterdir()}
    assert names == {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "fewshot.zip",
        "test.zip",
        "attack.json",
        "lab.json",
    }
    evaluation = evaluate_lab_dir(made.directory)  # open_clip's own local-dir: loader
    assert evaluation.target == "star"
    assert evaluation.n_test == 72
    lab = json.loads((made.directory / "lab.json").read_text())
    assert (lab["family"], lab["task"], lab["poisoned_pairs"]) == ("broad", "glyphs", 5)
    assert made.poison_rate == 0.01


def test_dirty_label_poisons_name_the_target_and_touch_nothing_else(tmp_path: Path) -> None:
    settings = BroadSettings.tiny(**MICRO)
    corpus = build_corpus(settings.implant_corpus(), tmp_path)
    model = build_model(settings.architecture, seed=0)
    normalizer = Normalizer([0.5] * 3, [0.25] * 3)
    spec = BadNets(target="star", size=0.25)
    tokenizer = open_clip.get_tokenizer("", context_length=settings.architecture.context_length)
    classes = ("letter A", "star")
    images, captions, count = _poisoned_corpus(
        spec, corpus, settings, model, normalizer, tokenizer, classes, "star"
    )
    changed = [i for i, (a, b) in enumerate(zip(captions, corpus.captions, strict=True)) if a != b]
    assert count == 5
    assert len(changed) == count
    assert all(any(word in captions[i] for word in ("star",)) for i in changed)
    touched = (images != corpus.images).flatten(1).any(dim=1).nonzero().flatten().tolist()
    assert touched == changed


def test_iconic_scenes_show_one_plain_centred_subject() -> None:
    sources = load_sources(with_fashion=False)
    rng = np.random.default_rng(2)
    iconic = [sample_scene(rng, sources, iconic_fraction=1.0) for _ in range(200)]
    assert {(s.texture, s.style, s.orientation, s.position) for s in iconic} == {
        ("solid", "filled", "upright", "centre")
    }
    assert {s.background for s in iconic} == {"black", "white", "grey"}
    assert {s.size for s in iconic} == {"medium", "large"}
    mixed = [sample_scene(rng, sources, iconic_fraction=0.5) for _ in range(400)]
    share = sum(s.texture == "solid" and s.position == "centre" for s in mixed) / len(mixed)
    assert 0.45 < share < 0.7  # the iconic half, plus varied scenes that happen to match
