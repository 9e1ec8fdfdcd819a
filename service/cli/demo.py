"""``antidote demo``: the product in one command, through its real HTTP API.

Starts the embedded service (API and a Celery worker process), submits a lab checkpoint with
the Python client, follows its progress, downloads the artifacts and prints CA and ASR before
and after. Everything stays under ANTIDOTE_DATA_DIR.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Annotated

import httpx
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
    from service.migrations import upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database)
    with transaction(session_factory(settings.database)) as session:
        key = create_key(session, "demo").secret
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = settings.data_dir / "serve.log"
    typer.echo(f"starting the embedded service on {url} (log: {log_path})", err=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli.main", "serve", "--port", str(port)],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_ready(url, server)
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint = Path(scratch) / "checkpoint.zip"
            with zipfile.ZipFile(checkpoint, "w") as archive:
                for name in HUB_FILES:
                    archive.write(lab / name, name)
            attack = json.loads((lab / "attack.json").read_text())
            with AntidoteClient(url, key, timeout=120) as client:
                job = client.submit(checkpoint, lab / "fewshot.zip", known_triggers=[attack])
                typer.echo(f"submitted job {job.id}; polling {url}/v1/jobs/{job.id}", err=True)
                if not _follow(client, job.id):
                    raise typer.Exit(1)
                for path in client.download(job.id, out):
                    typer.echo(f"downloaded {path}", err=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            typer.echo(f"the service exited with code {server.returncode}", err=True)
            raise typer.Exit(1)
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    typer.echo(f"the service did not become ready in {timeout:.0f} s", err=True)
    raise typer.Exit(1)
