"""How many BPE tokens open_clip's tokenizer makes of a text, without importing torch.

The options contract checks that ``tuning.context_init`` fills exactly ``n_ctx`` context
vectors, and the API checks options, but the API must not load torch. open_clip's
``SimpleTokenizer`` does the counting, and its module imports torch at the top, so this module
applies the same byte-pair merges, read from the vocabulary file open_clip ships, to count
tokens the way it does. ``tests/test_options.py`` holds the two to the same counts.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import itertools
from pathlib import Path

import ftfy
import regex

# The merges open_clip's SimpleTokenizer reads from its vocabulary: 49152 tokens less 256 bytes,
# their 256 end-of-word forms, the two special tokens, plus the file's header line.
_MERGES = 49152 - 256 - 2
_SPECIAL = ("<start_of_text>", "<end_of_text>")
_PIECES = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def token_count(text: str) -> int:
    """The number of tokens ``SimpleTokenizer().encode(text)`` returns (no start or end)."""
    cleaned = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
    encoder = _byte_encoder()
    return sum(
        1 if piece in _SPECIAL else len(_merge("".join(encoder[b] for b in piece.encode("utf-8"))))
        for piece in _PIECES.findall(cleaned)
    )


@functools.cache
def _byte_encoder() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters, which the merges are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


@functools.cache
def _ranks() -> dict[tuple[str, str], int]:
    with gzip.open(_vocabulary_file()) as file:
        lines = file.read().decode("utf-8").split("\n")[1 : _MERGES + 1]
    pairs = (tuple(line.split()) for line in lines)
    return {(first, second): rank for rank, (first, second) in enumerate(pairs)}


def _vocabulary_file() -> Path:
    """open_clip's vocabulary, found without executing its package (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=4096)
def _merge(piece: str) -> tuple[str, ...]:
    """The symbols one pre-tokenised piece ends as, merging the lowest-ranked pair first."""
    word: tuple[str, ...] = (*piece[:-1], piece[-1] + "</w>")
    ranks = _ranks()
    while len(word) > 1:
        pairs = set(itertools.pairwise(word))
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged: list[str] = []
        index = 0
        while index < len(word):
            if index < len(word) - 1 and (word[index], word[index + 1]) == best:
                merged.append(word[index] + word[index + 1])
                index += 2
            else:
                merged.append(word[index])
                index += 1
        word = tuple(merged)
    return word
