"""Embeddings and head descriptions move out of the database into vector shards (``indexer.vectors``):
each item names the shard holding its row instead.

The rows are moved in the migration's own transaction: the shards are written first, then the items point
at them and the two columns go. A migration killed midway leaves the database as it was and some shard
files no item points at, which the next index run deletes. Items embedded before descriptions were stored
(revision 0002) lose their embedding instead: the next index run over their folder or CSV embeds and
describes them in one pass, as it would have described them.

The vector store comes from ``indexer.db.upgrade`` (``config.attributes["vectors"]``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROWS_PER_SHARD = 4096
# SQLite recreates the table to drop a column; ids of deleted items must stay never reused (indexer.models.Item).
KEEP_AUTOINCREMENT = {"sqlite_autoincrement": True}

items = sa.table("items", sa.column("id", sa.Integer), sa.column("embedding", sa.LargeBinary), sa.column("descriptors", sa.LargeBinary),
                 sa.column("model_key", sa.String), sa.column("embedded_version", sa.BigInteger), sa.column("shard", sa.String))


def _store(connection: sa.Connection, pending: sa.ColumnElement[bool]) -> Any:  # an indexer.vectors.VectorStore
    store = op.get_context().config.attributes.get("vectors")
    if store is None and connection.scalar(sa.select(sa.func.count()).select_from(items).where(pending)):
        raise RuntimeError("moving embeddings between the database and the vector shards needs the vector store: "
                           "upgrade with indexer.db.upgrade(engine, vectors=VectorStore(url)) or `whymatch db upgrade`")
    return store


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("shard", sa.String(length=64), nullable=True))
        batch.create_index("ix_items_shard", ["shard"], unique=False)
    connection = op.get_bind()
    connection.execute(sa.update(items).where(items.c.embedding.is_not(None), items.c.descriptors.is_(None))
                       .values(embedding=None, model_key=None, embedded_version=None))
    store = _store(connection, items.c.embedding.is_not(None))
    last = -1
    while True:
        rows = connection.execute(sa.select(items.c.id, items.c.embedding, items.c.descriptors, items.c.embedded_version)
                                  .where(items.c.id > last, items.c.embedding.is_not(None))
                                  .order_by(items.c.id).limit(ROWS_PER_SHARD)).all()
        if not rows:
            break
        last = rows[-1].id
        vectors = np.stack([np.frombuffer(row.embedding, "<f4") for row in rows])
        name = store.write([row.id for row in rows], vectors, [row.descriptors for row in rows],
                           tag=max(int(row.embedded_version or 0) for row in rows))
        for chunk in range(0, len(rows), 500):
            ids = [row.id for row in rows[chunk : chunk + 500]]
            connection.execute(sa.update(items).where(items.c.id.in_(ids)).values(shard=name))
    with op.batch_alter_table("items", table_kwargs=KEEP_AUTOINCREMENT) as batch:
        batch.drop_column("descriptors")
        batch.drop_column("embedding")


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("embedding", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("descriptors", sa.LargeBinary(), nullable=True))
    connection = op.get_bind()
    store = _store(connection, items.c.shard.is_not(None))
    names = connection.scalars(sa.select(items.c.shard).where(items.c.shard.is_not(None)).distinct()).all()
    for name in names:
        ids = connection.scalars(sa.select(items.c.id).where(items.c.shard == name)).all()
        rows = store.read(name, ids)
        for item_id, vector, description in zip(rows.ids.tolist(), rows.embeddings, rows.descriptions):
            connection.execute(sa.update(items).where(items.c.id == item_id).values(
                embedding=np.asarray(vector, "<f4").tobytes(), descriptors=description))
    with op.batch_alter_table("items", table_kwargs=KEEP_AUTOINCREMENT) as batch:
        batch.drop_index("ix_items_shard")
        batch.drop_column("shard")
