"""Helpers for service tests: settings on a fresh data dir, keys, and real server processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.auth import create_key
from service.db import session_factory, transaction
from service.migrations import upgrade
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def embedded_settings(data_dir: Path, **overrides: object) -> Settings:
    settings = Settings(data_dir=data_dir, **overrides)  # type: ignore[arg-type]
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database)
    return settings


def new_key(settings: Settings, tenant: str) -> str:
    with transaction(session_factory(settings.database)) as session:
        return create_key(session, tenant).secret


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def start_server(env: dict[str, str], log: Path, *, api_only: bool = False) -> Server:
    """``antidote serve`` as users run it: uvicorn plus a real Celery worker process."""
    port = free_port()
    command = [
        sys.executable, "-m", "service.cli.main", "serve", "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    if api_only:
        command.append("--api-only")
    process = subprocess.Popen(
        command,
        env={**os.environ, **env},
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited early:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return Server(url, process, log)
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop_server(Server(url, process, log))
    raise RuntimeError(f"serve not ready in 60 s:\n{log.read_text()[-4000:]}")


def stop_server(server: Server) -> None:
    """A warm stop (the server stops its worker), then a sweep of the whole process group, so
    that no worker outlives its test even when its own shutdown hangs."""
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(45)
    with contextlib.suppress(ProcessLookupError):  # nothing left: all had exited
        os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (no psutil needed on Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name sits in parentheses and may hold spaces; fields follow the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def worker_processes(server: Server) -> tuple[int, list[int]]:
    """The Celery main process under ``antidote serve`` and its pool children."""
    for pid in children(server.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"celery" in command:
            return pid, children(pid)
    raise LookupError("no Celery worker under the server process")
