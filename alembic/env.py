"""Alembic environment: the URL comes from ``service.migrations.alembic_config``."""

from __future__ import annotations

from alembic import context

import service.models  # noqa: F401 - registers the tables on the metadata
from service.db import Base, make_engine

config = context.config
url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
if not url:
    from service.settings import get_settings

    url = get_settings().database


def run_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            compare_type=True,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()  # migrations leave no pooled connections behind


if context.is_offline_mode():
    run_offline()
else:
    run_online()
