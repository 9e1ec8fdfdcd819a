"""Helpers for service tests: settings on a fresh data dir, keys, and real server processes."""

from __future__ import annotations

from pathlib import Path

from service.auth import create_key
from service.db import session_factory, transaction
from service.local import LocalServer as Server
from service.local import free_port, start_server, stop_server
from service.migrations import upgrade
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]

__all__ = [
    "REPO",
    "Server",
    "children",
    "embedded_settings",
    "free_port",
    "new_key",
    "start_server",
    "stop_server",
    "worker_processes",
]


def embedded_settings(data_dir: Path, **overrides: object) -> Settings:
    settings = Settings(data_dir=data_dir, **overrides)  # type: ignore[arg-type]
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database)
    return settings


def new_key(settings: Settings, tenant: str) -> str:
    with transaction(session_factory(settings.database)) as session:
        return create_key(session, tenant).secret


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
