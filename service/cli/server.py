"""``antidote serve``, ``db`` and ``keys``: running and administering the service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Annotated

import typer
from rich.console import Console

from service.settings import get_settings

db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)

err = Console(stderr=True)


def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_only: Annotated[
        bool, typer.Option("--api-only", help="No worker beside the API (production).")
    ] = False,
    migrate: Annotated[
        bool | None,
        typer.Option(help="Upgrade the schema first; on by default in embedded mode only."),
    ] = None,
) -> None:
    """Runs the API, and (unless --api-only) a Celery worker process beside it.

    With no ANTIDOTE_DATABASE_URL or ANTIDOTE_BROKER_URL this is the embedded mode: SQLite,
    a filesystem queue and the blob store, all under ANTIDOTE_DATA_DIR (./var).
    """
    import uvicorn

    from service.api import create_app
    from service.migrations import upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate if migrate is not None else settings.database_url is None:
        upgrade(settings.database)
    else:
        _schema_ready()
    supervisor = None if api_only else WorkerSupervisor()
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_config=None)
    finally:
        if supervisor is not None:
            supervisor.stop()


class WorkerSupervisor:
    """Keeps one embedded worker process alive: a worker killed (say by the OOM killer) is
    started again, and its job comes back through the lease and the reaper."""

    def __init__(self, backoff_s: float = 2.0) -> None:
        self._backoff_s = backoff_s
        self._stopping = threading.Event()
        self.worker = start_worker()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            code = self.worker.poll()
            if code is None:
                continue
            err.print(f"worker exited with code {code}; starting a new one")
            if self._stopping.wait(self._backoff_s):
                return
            self.worker = start_worker()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        stop_worker(self.worker)


def start_worker(extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A real Celery worker (prefork, one child: time limits need prefork) on the job queue."""
    settings = get_settings()
    env = {**os.environ, "ANTIDOTE_DATA_DIR": str(settings.data_dir.resolve()), **(extra_env or {})}
    command = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", settings.worker_queue, "-P", "prefork", "-c", "1", "--loglevel", "INFO",
        "-n", f"embedded-{os.getpid()}@%h", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    return subprocess.Popen(command, env=env)


def stop_worker(worker: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Warm shutdown first (a running job is handed back by its lease), then a kill."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _schema_ready() -> None:
    """Migrates the embedded database, or checks an external one; one line and exit 1 if not."""
    from service.migrations import SchemaNotReadyError, ensure_schema

    try:
        ensure_schema(get_settings())
    except SchemaNotReadyError as exc:
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Applies migrations; run it as its own step before starting API replicas."""
    from service.migrations import current_revision, upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database, revision)
    err.print(f"database at revision {current_revision(settings.database)}")


@db_app.command("current")
def db_current() -> None:
    """Prints the schema revision the database is at (empty if none)."""
    from service.migrations import current_revision

    print(current_revision(get_settings().database) or "")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for.")],
) -> None:
    """Creates a key; the secret is printed once, alone on the last line."""
    from service.auth import create_key
    from service.db import session_factory, transaction

    _schema_ready()
    try:
        with transaction(session_factory(get_settings().database)) as session:
            issued = create_key(session, tenant)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    err.print(f"key {issued.id} for tenant {issued.tenant}; store the secret now, it is not kept:")
    print(issued.secret)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id (key_...).")]) -> None:
    """Revokes a key at once; requests carrying it get 401."""
    from service.auth import revoke_key
    from service.db import session_factory, transaction

    _schema_ready()
    with transaction(session_factory(get_settings().database)) as session:
        done = revoke_key(session, key_id)
    if not done:
        err.print(f"no active key {key_id}")
        raise typer.Exit(1)
    err.print(f"revoked {key_id}")


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
) -> None:
    """Lists keys (ids and prefixes only; secrets are never stored)."""
    from service.auth import list_keys
    from service.db import session_factory

    _schema_ready()
    with session_factory(get_settings().database)() as session:
        for key in list_keys(session, tenant):
            state = "revoked" if key.revoke_time else "active"
            print(f"{key.id}\t{key.tenant}\t{key.prefix}...\t{state}\t{key.create_time:%Y-%m-%d}")
