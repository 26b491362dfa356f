"""detection: precomputed suggestions carry served_at; detection models have no head

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 16:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('suggestions') as batch:
        batch.add_column(sa.Column('served_at', sa.DateTime(timezone=True), nullable=True))
    # every suggestion stored before this revision was stored because it was served
    op.execute('UPDATE suggestions SET served_at = created_at')
    with op.batch_alter_table('model_versions') as batch:
        batch.alter_column('head_key', existing_type=sa.String(length=200), nullable=True)
        batch.alter_column('head_sha256', existing_type=sa.String(length=64), nullable=True)


def downgrade() -> None:
    with op.batch_alter_table('model_versions') as batch:
        batch.alter_column('head_sha256', existing_type=sa.String(length=64), nullable=False)
        batch.alter_column('head_key', existing_type=sa.String(length=200), nullable=False)
    with op.batch_alter_table('suggestions') as batch:
        batch.drop_column('served_at')
