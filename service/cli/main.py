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
# Engine commands run the method in this process (they load torch); service commands run or
# talk to the service (they never do). The help lists them apart.
ENGINE, SERVICE, CLIENT = "Engine (local, torch)", "Service", "Client (HTTP)"
app.command("purify", rich_help_panel=ENGINE)(purify)
app.add_typer(lab.app, name="lab", rich_help_panel=ENGINE)
app.command("serve", rich_help_panel=SERVICE)(server.serve)
app.add_typer(server.db_app, name="db", rich_help_panel=SERVICE)
app.add_typer(server.keys_app, name="keys", rich_help_panel=SERVICE)
app.command("demo", rich_help_panel=SERVICE)(demo.demo)
app.command("submit", rich_help_panel=CLIENT)(remote.submit)
app.command("status", rich_help_panel=CLIENT)(remote.status)
app.command("wait", rich_help_panel=CLIENT)(remote.wait)
app.command("download", rich_help_panel=CLIENT)(remote.download)
app.command("cancel", rich_help_panel=CLIENT)(remote.cancel)


if __name__ == "__main__":
    app()
