"""The ``antidote`` command line."""

from __future__ import annotations

import os

import typer

from service.cli import lab
from service.cli.purify import purify

# Model weights never come from a hub here: fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(
    help="clip-antidote: purify backdoored CLIP models with class-wise prompt tuning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(lab.app, name="lab")
app.command("purify")(purify)
