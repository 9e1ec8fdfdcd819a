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

from service.db import engine_for


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
