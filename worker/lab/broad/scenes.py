"""Scenes of the broad corpus: what one image shows, drawn by a seeded procedure.

A scene is one subject (a shape, a letter, a handwritten digit or a garment) with attributes
(colour, texture, style, orientation, size, position) on a background. It is drawn at four
times the model's input size and downsampled, so edges are anti-aliased as in a photograph's
thumbnail. Every random choice comes from the scene's own ``variation`` seed, so a scene renders
to the same pixels wherever and whenever it is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from worker.lab.broad.concepts import (
    BACKGROUNDS,
    COLOURS,
    ORIENTATIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    TEXTURES,
)
from worker.lab.broad.fonts import PRETRAINING_FONTS, font

SUPERSAMPLE = 4
_SIZE_FRACTION = {"small": 0.38, "medium": 0.56, "large": 0.8}
_PLAIN_BACKGROUNDS = {"black": 15.0, "white": 245.0, "grey": 128.0}


@dataclass(frozen=True)
class Scene:
    """What an image shows; ``source`` indexes the digit or garment image for those groups."""

    group: str
    subject: str
    colour: str
    texture: str
    style: str
    orientation: str
    size: str
    position: str
    background: str
    font: str | None
    source: int | None
    variation: int


@dataclass(frozen=True)
class Sources:
    """Grey-scale source images ``(N, H, W)`` uint8 and their class names, per group."""

    digits: tuple[np.ndarray, tuple[str, ...]]
    fashion: tuple[np.ndarray, tuple[str, ...]] | None

    def pool(self, group: str) -> tuple[np.ndarray, tuple[str, ...]]:
        chosen = self.digits if group == "digit" else self.fashion
        if chosen is None:
            raise ValueError(f"no source images for {group!r}")
        return chosen


def sample_scene(
    rng: np.random.Generator,
    sources: Sources,
    *,
    iconic_fraction: float = 0.0,
    fonts: tuple[str, ...] = PRETRAINING_FONTS,
) -> Scene:
    """One pretraining scene; every attribute is drawn uniformly within its group.

    With probability ``iconic_fraction`` the scene is iconic instead: the subject solid, filled,
    upright, medium or large and centred on a plain background, as web corpora hold many
    iconic object pictures. Without them a small CLIP learns colour and background, the
    features that tell a batch's pairs apart soonest, and never the subjects
    (``bench/corpus.py`` measures it).
    """
    iconic = rng.random() < iconic_fraction
    groups = ["shape", "letter", "digit"] + (["fashion"] if sources.fashion else [])
    weights = np.array([0.3, 0.35, 0.15, 0.2][: len(groups)])
    group = groups[int(rng.choice(len(groups), p=weights / weights.sum()))]
    source: int | None = None
    subject_font: str | None = None
    if group == "shape":
        subject = _pick(rng, tuple(SHAPES))
    elif group == "letter":
        subject = f"letter {chr(ord('A') + int(rng.integers(26)))}"
        subject_font = _pick(rng, fonts)
    else:
        images, names = sources.pool(group)
        source = int(rng.integers(len(images)))
        subject = names[source]
    if iconic:
        background = _pick(rng, tuple(_PLAIN_BACKGROUNDS))
        size = _pick(rng, ("medium", "large"))
        texture, style, orientation, position = "solid", "filled", "upright", "centre"
    else:
        background = _pick(rng, tuple(BACKGROUNDS))
        size = _pick(rng, tuple(SIZES))
        texture = _pick(rng, tuple(TEXTURES))
        style = _pick(rng, tuple(STYLES))
        orientation = _pick(rng, tuple(ORIENTATIONS))
        position = "centre" if size == "large" else _pick(rng, tuple(POSITIONS))
    return Scene(
        group=group,
        subject=subject,
        colour=_pick(rng, _colours_against(background)),
        texture=texture,
        style=style,
        orientation=orientation,
        size=size,
        position=position,
        background=background,
        font=subject_font,
        source=source,
        variation=int(rng.integers(2**31)),
    )


def render(
    scene: Scene,
    side: int,
    sources: Sources,
    *,
    ink: tuple[int, int, int] | None = None,
    paper: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """The scene as ``(side, side, 3)`` uint8. ``ink`` and ``paper`` replace the colour and the
    background with colours of the caller's (a downstream task's shift)."""
    rng = np.random.default_rng(scene.variation)
    canvas = side * SUPERSAMPLE
    background = (
        np.broadcast_to(np.array(paper, dtype=np.float32), (canvas, canvas, 3))
        if paper is not None
        else _background(scene.background, canvas, rng)
    )
    mask = _subject_mask(scene, canvas, sources, rng)
    colour = np.array(ink if ink is not None else COLOURS[scene.colour][1], dtype=np.float32)
    pattern = _texture(scene.texture, canvas, rng)[..., None]
    contrast = np.full(3, 255.0 if colour.mean() < 128 else 0.0, dtype=np.float32)
    second = 0.55 * colour + 0.45 * contrast
    layer = colour * pattern + second * (1 - pattern)
    alpha = mask[..., None]
    pixels = background * (1 - alpha) + layer * alpha
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    return np.array(image.resize((side, side), Image.Resampling.BOX))


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _colours_against(background: str) -> tuple[str, ...]:
    """Colours that stand out from the background: no black on black, no grey on grey."""
    level = _PLAIN_BACKGROUNDS.get(background, 128.0)
    return tuple(
        name for name, (_, rgb) in COLOURS.items() if abs(sum(rgb) / 3 - level) > 70
    ) or tuple(COLOURS)


def _background(kind: str, canvas: int, rng: np.random.Generator) -> np.ndarray:
    if kind in _PLAIN_BACKGROUNDS:
        grey = np.full((canvas, canvas), _PLAIN_BACKGROUNDS[kind], dtype=np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        y, x = np.mgrid[0:canvas, 0:canvas].astype(np.float32) / canvas - 0.5
        ramp = (x * math.cos(angle) + y * math.sin(angle)) / math.sqrt(0.5) + 0.5
        grey = 30 + 190 * np.clip(ramp, 0, 1)
    elif kind == "noise":
        cell = 2 * SUPERSAMPLE  # 2 px at the model's size: grain, not clutter
        coarse = rng.uniform(90, 170, (canvas // cell + 1, canvas // cell + 1)).astype(np.float32)
        grey = np.kron(coarse, np.ones((cell, cell), dtype=np.float32))[:canvas, :canvas]
    elif kind == "checkerboard":
        cell = canvas // int(rng.integers(4, 9))
        y, x = np.mgrid[0:canvas, 0:canvas] // max(1, cell)
        grey = np.where((x + y) % 2 == 0, 70.0, 170.0).astype(np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.repeat(grey[..., None], 3, axis=2)


def _subject_mask(
    scene: Scene, canvas: int, sources: Sources, rng: np.random.Generator
) -> np.ndarray:
    """The subject's coverage in [0, 1], placed, rotated and outlined as the scene says."""
    fraction = _SIZE_FRACTION[scene.size] * rng.uniform(0.9, 1.1)
    box = max(4, round(canvas * fraction))
    tile = Image.new("L", (box, box), 0)
    if scene.group == "shape":
        _draw_shape(ImageDraw.Draw(tile), scene.subject, box)
    elif scene.group == "letter":
        _draw_glyph(tile, scene.subject[-1], scene.font or PRETRAINING_FONTS[0])
    else:
        images, _ = sources.pool(scene.group)
        assert scene.source is not None
        source = Image.fromarray(images[scene.source])
        tile = source.resize((box, box), Image.Resampling.BILINEAR)
    angle = {
        "upright": rng.uniform(-8, 8),
        "tilted": float(rng.choice([-1, 1])) * rng.uniform(20, 45),
        "upside down": 180 + rng.uniform(-8, 8),
    }[scene.orientation]
    tile = tile.rotate(angle, resample=Image.Resampling.BILINEAR)
    if scene.style == "outlined":
        width = max(3, (box // 10) | 1)
        tile = Image.fromarray(
            np.clip(
                np.asarray(tile, dtype=np.int16)
                - np.asarray(tile.filter(ImageFilter.MinFilter(width)), dtype=np.int16),
                0,
                255,
            ).astype(np.uint8)
        )
    layer = Image.new("L", (canvas, canvas), 0)
    margin = round(canvas * 0.04)
    jitter = round(canvas * 0.03)
    slack = canvas - box - 2 * margin
    centre = max(0, (canvas - box) // 2)
    left = {"left": margin, "right": margin + slack}
    top = {"top": margin, "bottom": margin + slack}
    if scene.position == "centre":
        x = centre + int(rng.integers(-jitter, jitter + 1))
        y = centre + int(rng.integers(-jitter, jitter + 1))
    else:
        vertical, horizontal = scene.position.split()
        x, y = left[horizontal], top[vertical]
    layer.paste(tile, (x, y))
    return np.asarray(layer, dtype=np.float32) / 255


def _draw_glyph(tile: Image.Image, character: str, face: str) -> None:
    side = tile.width
    glyph = font(face, max(6, round(side * 0.9)))
    draw = ImageDraw.Draw(tile)
    left, top, right, bottom = draw.textbbox((0, 0), character, font=glyph)
    x = (side - (right - left)) / 2 - left
    y = (side - (bottom - top)) / 2 - top
    draw.text((x, y), character, fill=255, font=glyph)


def _regular(sides: int, box: int, rotation: float = -90.0, scale: float = 0.46) -> list[float]:
    centre = box / 2
    points: list[float] = []
    for k in range(sides):
        theta = math.radians(rotation + 360 * k / sides)
        points += [centre + scale * box * math.cos(theta), centre + scale * box * math.sin(theta)]
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, box: int) -> None:
    b = box
    if name == "circle":
        draw.ellipse((0.05 * b, 0.05 * b, 0.95 * b, 0.95 * b), fill=255)
    elif name == "oval":
        draw.ellipse((0.05 * b, 0.25 * b, 0.95 * b, 0.75 * b), fill=255)
    elif name == "ring":
        draw.ellipse((0.05 * b, 0.05 * b, 0.95 * b, 0.95 * b), fill=255)
        draw.ellipse((0.3 * b, 0.3 * b, 0.7 * b, 0.7 * b), fill=0)
    elif name == "crescent":
        draw.ellipse((0.05 * b, 0.05 * b, 0.95 * b, 0.95 * b), fill=255)
        draw.ellipse((0.3 * b, -0.05 * b, 1.1 * b, 0.8 * b), fill=0)
    elif name == "square":
        draw.rectangle((0.1 * b, 0.1 * b, 0.9 * b, 0.9 * b), fill=255)
    elif name == "rectangle":
        draw.rectangle((0.05 * b, 0.3 * b, 0.95 * b, 0.7 * b), fill=255)
    elif name == "cross":
        draw.rectangle((0.38 * b, 0.05 * b, 0.62 * b, 0.95 * b), fill=255)
        draw.rectangle((0.05 * b, 0.38 * b, 0.95 * b, 0.62 * b), fill=255)
    elif name == "heart":
        draw.ellipse((0.05 * b, 0.1 * b, 0.52 * b, 0.55 * b), fill=255)
        draw.ellipse((0.48 * b, 0.1 * b, 0.95 * b, 0.55 * b), fill=255)
        draw.polygon([0.07 * b, 0.42 * b, 0.93 * b, 0.42 * b, 0.5 * b, 0.95 * b], fill=255)
    elif name == "arrow":
        draw.rectangle((0.05 * b, 0.4 * b, 0.6 * b, 0.6 * b), fill=255)
        draw.polygon([0.55 * b, 0.15 * b, 0.95 * b, 0.5 * b, 0.55 * b, 0.85 * b], fill=255)
    elif name == "trapezoid":
        corners = [0.3, 0.2, 0.7, 0.2, 0.95, 0.8, 0.05, 0.8]
        draw.polygon([c * b for c in corners], fill=255)
    elif name == "star":
        points: list[float] = []
        for k in range(10):
            radius = 0.47 if k % 2 == 0 else 0.19
            theta = math.radians(-90 + 36 * k)
            points += [b / 2 + radius * b * math.cos(theta), b / 2 + radius * b * math.sin(theta)]
        draw.polygon(points, fill=255)
    else:
        sides = {"triangle": 3, "diamond": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}[name]
        draw.polygon(_regular(sides, b, rotation=-90.0 if sides != 8 else -67.5), fill=255)


def _texture(kind: str, canvas: int, rng: np.random.Generator) -> np.ndarray:
    """A fill pattern in [0, 1]: 1 takes the colour, 0 its contrasting tone."""
    y, x = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    period = canvas / rng.uniform(5, 9)
    angle = rng.uniform(0, math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    pattern: np.ndarray
    if kind == "solid":
        pattern = np.ones((canvas, canvas))
    elif kind == "striped":
        pattern = np.sin(2 * math.pi * along / period) > 0
    elif kind == "dotted":
        cy, cx = (y % period) - period / 2, (x % period) - period / 2
        pattern = np.hypot(cx, cy) > period * 0.28
    elif kind == "checkered":
        pattern = ((x // period) + (y // period)) % 2
    elif kind == "wavy":
        across = -x * math.sin(angle) + y * math.cos(angle)
        wave = np.sin(2 * math.pi * (along + 0.3 * period * np.sin(across / period * 3)) / period)
        pattern = wave > 0
    elif kind == "speckled":
        pattern = rng.random((canvas, canvas)) > 0.35
    elif kind == "shaded":
        pattern = np.clip(along / canvas, 0, 1)
    elif kind == "hatched":
        lines = (np.abs(((x + y) % period) - period / 2) < period * 0.12) | (
            np.abs(((x - y) % period) - period / 2) < period * 0.12
        )
        pattern = ~lines
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return pattern.astype(np.float32)
