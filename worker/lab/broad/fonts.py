"""Fonts for rendered glyphs, from matplotlib's package data (the DejaVu, STIX and Computer
Modern families, pinned with matplotlib's version in ``pyproject.toml``).

Pretraining draws its letters with the DejaVu faces; downstream tasks use the STIX and Computer
Modern faces, which pretraining never saw, so a task is a shift in style, as a user's data is.
The package is located without importing it: only its files are needed.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from PIL import ImageFont

PRETRAINING_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
)
HELD_OUT_FONTS: tuple[str, ...] = (
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
)


class FontsUnavailableError(RuntimeError):
    """matplotlib's font files are not installed (``make install`` installs them)."""


@functools.cache
def font_folder() -> Path:
    """matplotlib's ``mpl-data/fonts/ttf``."""
    spec = importlib.util.find_spec("matplotlib")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location) / "mpl-data" / "fonts" / "ttf"
        if (folder / PRETRAINING_FONTS[0]).is_file():
            return folder
    raise FontsUnavailableError("matplotlib's fonts not found: run `make install`")


@functools.cache
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """One of the named faces at ``size`` pixels (cached: loading a face costs milliseconds)."""
    if name not in PRETRAINING_FONTS + HELD_OUT_FONTS:
        raise ValueError(f"unknown lab font {name!r}")
    return ImageFont.truetype(str(font_folder() / name), size)
