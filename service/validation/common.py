"""What both checks share: the error they raise, how they quote names in it, and the small
readers of JSON and archive paths both use."""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from worker.cbpt.archives import Member
from worker.cbpt.errors import EngineError


class InputError(EngineError):
    """An upload is refused; ``code`` is stable (clients branch on it), ``detail`` is for people."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail, code=code)


def show(value: object) -> str:
    """A quoted, bounded rendering of client-supplied text for error details."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


U64_MAX = 2**64 - 1
"""Dimensions, offsets and element counts are u64 in safetensors; bounding them here also keeps
a hostile header from making the element count an enormous number to multiply."""


def parse_json_object(raw: bytes) -> dict[str, Any] | None:
    """A JSON object, or None for anything else: bad UTF-8, bad JSON, repeated keys, deep nesting.

    Repeated keys are refused because readers disagree on which value wins.
    """

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("repeated key")
        return result

    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=no_repeats)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def is_count(value: object) -> bool:
    """A non-negative integer that fits the u64 the safetensors format stores."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX


def member_depth(member: Member) -> int:
    return len(PurePosixPath(member.name).parts)
