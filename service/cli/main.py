"""The ``antidote`` command line."""

from __future__ import annotations

import os

import typer

from service.cli import demo, lab, remote, server
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
app.command("serve")(server.serve)
app.add_typer(server.db_app, name="db")
app.add_typer(server.keys_app, name="keys")
app.command("submit")(remote.submit)
app.command("status")(remote.status)
app.command("wait")(remote.wait)
app.command("download")(remote.download)
app.command("cancel")(remote.cancel)
app.command("demo")(demo.demo)


if __name__ == "__main__":
    app()
