"""The broad corpus's concepts, in groups, each with the words a caption may use for it.

The first word of each entry is the concept's canonical name: what a downstream task calls the
class. The others are synonyms that captions mix in, so that the text tower learns a concept
rather than a string. Counts: 16 shapes, 26 letters, 10 digits, 10 fashion items, 12 colours,
8 textures, 5 positions, 3 sizes, 6 backgrounds, 2 styles and 3 orientations (101 concepts;
91 without Fashion-MNIST).
"""

from __future__ import annotations

import string

SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star", "five-pointed star"),
    "hexagon": ("hexagon",),
    "pentagon": ("pentagon",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
    "heart": ("heart",),
    "ring": ("ring", "hoop", "annulus"),
    "crescent": ("crescent", "crescent moon"),
    "arrow": ("arrow",),
    "rectangle": ("rectangle", "bar"),
    "oval": ("oval", "ellipse"),
    "octagon": ("octagon",),
    "trapezoid": ("trapezoid", "trapezium"),
}

LETTERS: dict[str, tuple[str, ...]] = {
    f"letter {c}": (f"letter {c}", f"capital {c}", f"uppercase {c}", f"character {c}")
    for c in string.ascii_uppercase
}

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS: dict[str, tuple[str, ...]] = {
    f"handwritten {name}": (f"handwritten {name}", f"handwritten digit {name}", f"scrawled {name}")
    for name in DIGIT_NAMES
}

# Fashion-MNIST's classes, in its label order.
FASHION: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "tee", "tee shirt"),
    "trouser": ("trouser", "pair of trousers", "pair of pants"),
    "pullover": ("pullover", "sweater", "jumper"),
    "dress": ("dress", "frock"),
    "coat": ("coat", "jacket"),
    "sandal": ("sandal", "summer sandal"),
    "shirt": ("shirt", "button-up shirt", "collared shirt"),
    "sneaker": ("sneaker", "trainer", "running shoe"),
    "bag": ("bag", "handbag", "purse"),
    "ankle boot": ("ankle boot", "short boot"),
}

# RGB of each colour; the first word is the name.
COLOURS: dict[str, tuple[tuple[str, ...], tuple[int, int, int]]] = {
    "red": (("red", "scarlet"), (220, 30, 30)),
    "green": (("green", "emerald"), (40, 170, 60)),
    "blue": (("blue", "cobalt"), (40, 70, 220)),
    "yellow": (("yellow", "lemon"), (240, 220, 40)),
    "orange": (("orange", "tangerine"), (245, 140, 20)),
    "purple": (("purple", "violet"), (140, 50, 180)),
    "pink": (("pink", "rose"), (245, 130, 190)),
    "brown": (("brown", "chocolate"), (130, 80, 40)),
    "cyan": (("cyan", "turquoise"), (40, 210, 220)),
    "white": (("white", "snow-white"), (245, 245, 245)),
    "grey": (("grey", "gray"), (128, 128, 128)),
    "black": (("black", "jet-black"), (15, 15, 15)),
}

TEXTURES: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain", "flat"),
    "striped": ("striped", "stripy", "banded"),
    "dotted": ("dotted", "spotted", "polka-dot"),
    "checkered": ("checkered", "chequered", "tiled"),
    "wavy": ("wavy", "rippled"),
    "speckled": ("speckled", "grainy", "noisy"),
    "shaded": ("shaded", "gradient-filled"),
    "hatched": ("hatched", "cross-hatched"),
}

POSITIONS: dict[str, tuple[str, ...]] = {
    "centre": ("in the centre", "in the middle", "centred"),
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}

SIZES: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "medium": ("medium-sized", "mid-sized", "modest"),
    "large": ("large", "big", "huge"),
}

BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "black": ("black background", "dark backdrop", "black backdrop"),
    "white": ("white background", "blank white backdrop", "white backdrop"),
    "grey": ("grey background", "gray backdrop", "grey backdrop"),
    "gradient": ("gradient background", "fading backdrop", "graded backdrop"),
    "noise": ("noisy background", "static backdrop", "grainy backdrop"),
    "checkerboard": ("checkerboard background", "chessboard backdrop", "checked backdrop"),
}

STYLES: dict[str, tuple[str, ...]] = {
    "filled": ("filled", "solid-filled"),
    "outlined": ("outlined", "hollow", "outline-only"),
}

ORIENTATIONS: dict[str, tuple[str, ...]] = {
    "upright": ("upright", "standing straight"),
    "tilted": ("tilted", "slanted", "rotated a little"),
    "upside down": ("upside down", "inverted", "flipped over"),
}

SubjectGroup = str  # "shape", "letter", "digit" or "fashion"
SUBJECT_GROUPS: dict[SubjectGroup, dict[str, tuple[str, ...]]] = {
    "shape": SHAPES,
    "letter": LETTERS,
    "digit": DIGITS,
    "fashion": FASHION,
}


def concept_count(with_fashion: bool) -> int:
    """How many concepts a corpus covers: every subject and every attribute value."""
    sizes = [len(SHAPES), len(LETTERS), len(DIGITS), len(COLOURS), len(TEXTURES)]
    sizes += [len(POSITIONS), len(SIZES), len(BACKGROUNDS), len(STYLES), len(ORIENTATIONS)]
    return sum(sizes) + (len(FASHION) if with_fashion else 0)
