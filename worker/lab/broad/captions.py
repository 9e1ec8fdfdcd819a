"""Captions for scenes: a grammar of templates and synonyms that names several attributes.

Web captions describe a picture loosely and differently each time; a model learns concepts
from them, not the strings it is later prompted with. So each caption names the subject with
one of its synonyms, mentions each attribute with some probability and in its own words, and
uses one of many sentence templates. None of them is a zero-shot prompt: the words "photo",
"picture" and "image" never appear, and ``is_zero_shot_prompt`` checks open_clip's templates.
"""

from __future__ import annotations

import re

import numpy as np
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from worker.lab.broad.concepts import (
    BACKGROUNDS,
    COLOURS,
    ORIENTATIONS,
    POSITIONS,
    SIZES,
    STYLES,
    SUBJECT_GROUPS,
    TEXTURES,
)
from worker.lab.broad.scenes import Scene

# {s} is the subject with its modifiers, {p} a position phrase, {b} a background phrase. Half
# the templates name the subject alone: when colour, place and background are in most captions,
# a batch's pairs can be told apart by them and the towers never need to learn the subject.
TEMPLATES: tuple[str, ...] = (
    "{s}.",
    "{s}, rendered flat.",
    "clip art with {s}.",
    "a sticker with {s}.",
    "just {s}.",
    "{s} shown alone.",
    "an icon of {s}.",
    "here we see {s}.",
    "{s} {p} on a {b}.",
    "{s} on a {b}, {p}.",
    "an icon showing {s} on a {b}.",
    "{s} is drawn {p}.",
    "there is {s} {p}.",
    "a {b} with {s} {p}.",
    "{s} sketched on a {b}.",
    "graphic: {s}, {p}, {b}.",
)
_FORBIDDEN_WORDS = ("photo", "picture", "image")
MODIFIER_PROBABILITY = 0.25


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption of ``scene``: the subject always, each modifier a quarter of the time."""
    words: list[str] = []
    for mention in (
        SIZES[scene.size],
        COLOURS[scene.colour][0],
        TEXTURES[scene.texture],
        STYLES[scene.style],
        ORIENTATIONS[scene.orientation],
    ):
        if rng.random() < MODIFIER_PROBABILITY:
            words.append(_pick(rng, mention))
    words.append(_pick(rng, SUBJECT_GROUPS[scene.group][scene.subject]))
    subject = " ".join(words)
    subject = f"{_article(subject)} {subject}"
    template = _pick(rng, TEMPLATES)
    return template.format(
        s=subject,
        p=_pick(rng, POSITIONS[scene.position]),
        b=_pick(rng, BACKGROUNDS[scene.background]),
    )


def is_zero_shot_prompt(text: str) -> bool:
    """Whether ``text`` is an instance of a zero-shot template (open_clip's 80 ImageNet
    templates, "a photo of a {}." among them) or uses their words."""
    lowered = text.lower()
    if any(word in lowered for word in _FORBIDDEN_WORDS):
        return True
    return any(pattern.fullmatch(lowered) for pattern in _zero_shot_patterns())


def _zero_shot_patterns() -> list[re.Pattern[str]]:
    marker = "\x00"
    patterns = []
    for template in OPENAI_IMAGENET_TEMPLATES:
        parts = template(marker).lower().split(marker)
        patterns.append(re.compile(".+".join(re.escape(part) for part in parts)))
    return patterns


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"
