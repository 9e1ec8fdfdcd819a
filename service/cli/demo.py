"""``antidote demo``: the product in one command, through its real HTTP API.

Starts the embedded service (API and a Celery worker process), submits a lab checkpoint with
the Python client, follows its progress, downloads the artifacts and prints CA and ASR before
and after. Everything stays under ANTIDOTE_DATA_DIR.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated

import typer

from service.settings import get_settings

HUB_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


def demo(
    lab: Annotated[Path, typer.Option(help="A lab folder made by `antidote lab make`.")],
    out: Annotated[Path, typer.Option(help="Where the purified artifacts are downloaded.")],
) -> None:
    """Serve, submit a lab checkpoint over HTTP, follow it, download and print the result."""
    from service.auth import create_key
    from service.cli.remote import _follow
    from service.client import AntidoteClient
    from service.db import session_factory, transaction
    from service.local import start_server, stop_server
    from service.migrations import upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database)
    with transaction(session_factory(settings.database)) as session:
        key = create_key(session, "demo").secret
    log_path = settings.data_dir / "serve.log"
    typer.echo(f"starting the embedded service (log: {log_path})", err=True)
    try:
        server = start_server({}, log_path, timeout=120)
    except RuntimeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    try:
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint = Path(scratch) / "checkpoint.zip"
            with zipfile.ZipFile(checkpoint, "w") as archive:
                for name in HUB_FILES:
                    archive.write(lab / name, name)
            attack = json.loads((lab / "attack.json").read_text())
            with AntidoteClient(server.url, key, timeout=120) as client:
                job = client.submit(checkpoint, lab / "fewshot.zip", known_triggers=[attack])
                typer.echo(
                    f"submitted job {job.id}; polling {server.url}/v1/jobs/{job.id}", err=True
                )
                if not _follow(client, job.id):
                    raise typer.Exit(1)
                for path in client.download(job.id, out):
                    typer.echo(f"downloaded {path}", err=True)
    finally:
        stop_server(server)
