"""Alembic environment of the node's database, driven from code by ``dicom_node.db``.

:func:`dicom_node.db.alembic_config` puts the engine in ``config.attributes["engine"]``;
the ``alembic`` command line works too when ``-x url=...`` names the database.  Offline
(``--sql``) mode is not supported: the node always migrates a live database at start-up.
"""
from __future__ import annotations

from alembic import context

from dicom_node.db import Base, make_engine

config = context.config
target_metadata = Base.metadata


def _engine():
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise RuntimeError("no database: call dicom_node.db.upgrade_database(url) or pass -x url=<SQLAlchemy URL>")
    return make_engine(url)


def run_migrations_online() -> None:
    engine = _engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run them against the database")
run_migrations_online()
