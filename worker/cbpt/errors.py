"""The engine's errors: one base, one stable code each.

Part of the torch-free contract. Every error the engine raises about its inputs is an
``EngineError``: ``code`` is the UPPER_SNAKE code a client branches on (and never changes
meaning), the message is the detail for people, ``status`` the HTTP status a service answers
with. ``service.errors.problem_of`` turns any of them into an RFC 9457 problem, in the API and in
the worker alike.
"""

from __future__ import annotations


class EngineError(ValueError):
    """An input the engine cannot use."""

    code: str = "INPUT_INVALID"
    status: int = 422

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        if code is not None:
            self.code = code

    @property
    def detail(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputMismatchError(EngineError):
    """Inputs valid one by one that do not fit together (a class name too long for the model's
    text context, a trigger aimed at no class), found once both are loaded."""
