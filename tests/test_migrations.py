"""The Alembic migrations build exactly the schema the code declares, on both databases."""

from __future__ import annotations

from alembic import command

from service.migrate import alembic_config, upgrade


def test_migrations_match_tables(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)  # idempotent
    command.check(alembic_config(db_url))  # raises if the tables and the migrations differ
