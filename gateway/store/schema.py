"""Tables and their migrations. Each migration runs once, in order, recorded in schema_version."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

calls = sa.Table(
    "calls",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("direction", sa.String(16), nullable=False),
    sa.Column("carrier", sa.String(16), nullable=False),
    sa.Column("carrier_call_id", sa.String(255), nullable=False),
    # Text: SIP URIs can be long, and PostgreSQL (unlike SQLite) enforces lengths.
    sa.Column("from_number", sa.Text, nullable=False),
    sa.Column("to_number", sa.Text, nullable=False),
    sa.Column("route", sa.String(128)),
    sa.Column("ultravox_call_id", sa.String(64)),
    sa.Column("join_url", sa.Text),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("failure_reason", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # A carrier retry of the same call must find the first record, also across replicas.
    sa.UniqueConstraint("carrier", "carrier_call_id", name="uq_calls_carrier_call"),
    sa.Index("ix_calls_created_at", "created_at"),
    sa.Index("ix_calls_ultravox_call_id", "ultravox_call_id"),
)

schema_version = sa.Table(
    "schema_version",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)


def _create_v1(connection: sa.Connection) -> None:
    metadata.create_all(connection, tables=[calls])


# Append new migrations; never edit one that has shipped.
MIGRATIONS = [_create_v1]
