"""``antidote serve`` as a child process on a free loopback port: for the demo, the benchmarks
and the tests, which all need the real thing (uvicorn and, unless API-only, a Celery worker)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class LocalServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(
    env: Mapping[str, str], log: Path, *, api_only: bool = False, timeout: float = 60.0
) -> LocalServer:
    """Starts the server in its own process group, with ``env`` over this process's; returns
    once ``/readyz`` answers 200, or raises RuntimeError with the end of its log."""
    port = free_port()
    command = [
        sys.executable, "-m", "service.cli.main", "serve", "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    if api_only:
        command.append("--api-only")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = LocalServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited early:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"serve not ready in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop_server(server: LocalServer) -> None:
    """A warm stop (the server stops its worker), then a sweep of the whole process group, so
    that no worker outlives its server even when its own shutdown hangs."""
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(45)
    with contextlib.suppress(ProcessLookupError):  # nothing left: all had exited
        os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()
