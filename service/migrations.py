"""Schema migrations (Alembic), run as their own step: ``antidote db upgrade``.

The migration scripts live in the top-level ``alembic/`` folder; the database URL always comes
from the settings, never from an ini file, so one set of scripts serves SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from service.db import engine_for
from service.settings import Settings


class SchemaNotReadyError(RuntimeError):
    """The database is not at the schema this code needs; the message names the fix."""


def script_location() -> Path:
    """The repository's ``alembic/``; an installed copy runs from the folder that holds it."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        candidate = root / "alembic"
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("alembic/ migration scripts not found next to the package or in cwd")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    with engine_for(database_url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision(database_url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


def ensure_schema(settings: Settings) -> None:
    """Makes sure the database is at the head revision before a command touches it.

    The embedded SQLite database belongs to this process's data dir, so it is created and
    upgraded here, as ``serve`` does; a fresh data dir then works with any command. An external
    database is shared by replicas and upgraded as its own step, so it is only checked, and
    ``SchemaNotReadyError`` names ``antidote db upgrade``.
    """
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.database)
        return
    current, head = current_revision(settings.database), head_revision(settings.database)
    if current != head:
        where = make_url(settings.database).render_as_string(hide_password=True)
        raise SchemaNotReadyError(
            f"the database at {where} is at schema revision {current or 'none'}, not {head}: "
            "run `antidote db upgrade` first"
        )
