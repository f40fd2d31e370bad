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
    # Unknown until the carrier (or Ultravox) has placed an outbound call.
    sa.Column("carrier_call_id", sa.String(255)),
    sa.Column("via", sa.String(16)),  # outbound: "carrier" or "ultravox"
    # Text: SIP URIs can be long, and PostgreSQL (unlike SQLite) enforces lengths.
    sa.Column("from_number", sa.Text, nullable=False),
    sa.Column("to_number", sa.Text, nullable=False),
    sa.Column("route", sa.String(128)),
    sa.Column("ultravox_call_id", sa.String(64)),
    sa.Column("join_url", sa.Text),
    sa.Column("status", sa.String(32), nullable=False),
    # Order of statuses; a status update only ever moves forward (events arrive out of order).
    sa.Column("status_rank", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failure_reason", sa.Text),
    sa.Column("end_reason", sa.Text),
    sa.Column("answered_by", sa.String(32)),
    sa.Column("duration_seconds", sa.Integer),
    sa.Column("summary", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
    # Outbound requests: who asked, their idempotency key, and what they asked for.
    sa.Column("api_key_id", sa.String(16)),
    sa.Column("idempotency_key", sa.String(255)),
    sa.Column("request_hash", sa.String(64)),
    sa.Column("request_json", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("answered_at", sa.DateTime(timezone=True)),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    # Outbound: set by the one answer webhook delivery that creates the Ultravox call.
    sa.Column("agent_claimed_at", sa.DateTime(timezone=True)),
    # Bridge mode (added by migration 3): audio counters (JSON) and the call's WAV, if recorded.
    sa.Column("media_stats", sa.Text),
    sa.Column("recording_path", sa.Text),
    # Bridge mode (migration 4): the media token last used, so each opens one socket, on any replica.
    sa.Column("media_token", sa.String(64)),
    # Outbound (migration 5): when the carrier (or Ultravox) accepted the dial, so a retried request
    # knows the first one is done placing it.
    sa.Column("placed_at", sa.DateTime(timezone=True)),
    # Inbound (migration 12): the process creating the Ultravox call and until when it holds the
    # record; past that another replica settles the record (see flows/inbound.py).
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    # Bridge mode (migration 12): the expiry of the one media token the call's answer carries, so
    # every delivery of the call's webhook gets the same token.
    sa.Column("stream_expires", sa.BigInteger),
    # A carrier retry of the same call must find the first record, also across replicas.
    sa.UniqueConstraint("carrier", "carrier_call_id", name="uq_calls_carrier_call"),
    # A retried dial request must find the first call instead of dialling twice.
    sa.UniqueConstraint("api_key_id", "idempotency_key", name="uq_calls_idempotency"),
    sa.Index("ix_calls_created_at", "created_at", "id"),
    sa.Index("ix_calls_ultravox_call_id", "ultravox_call_id"),
    sa.Index("ix_calls_key_created", "api_key_id", "created_at"),
    # /metrics counts the live calls at every scrape: one short range per live status (migration 6).
    sa.Index("ix_calls_status_created", "status", "created_at"),
)

schema_version = sa.Table(
    "schema_version",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)


transfers = sa.Table(
    "transfers",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("call_id", sa.String(36), sa.ForeignKey("calls.id"), nullable=False),
    sa.Column("kind", sa.String(8), nullable=False),  # cold | warm
    sa.Column("operator", sa.String(40), nullable=False),  # the one being tried now
    sa.Column("operators_tried", sa.Text, nullable=False, server_default=""),  # comma-separated
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("summary", sa.Text),
    # requested -> dialing -> connected (to a person) | returned (to the agent) | failed
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("outcome", sa.Text),  # why it ended: answered, no-answer, busy, declined, closed, carrier error…
    sa.Column("operator_leg_id", sa.String(255)),  # warm: the carrier call id of the operator's leg
    # Warm: which operator leg is current (0, 1, … as fallbacks are tried); events of older legs are stale.
    sa.Column("leg", sa.Integer, nullable=False, server_default="0"),
    sa.Column("prior_ultravox_call_id", sa.String(64)),
    sa.Column("new_ultravox_call_id", sa.String(64)),
    # The call's id while this transfer is under way, NULL after: one transfer at a time per call,
    # enforced by the database across replicas.
    sa.Column("active_call_id", sa.String(36), unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("answered_at", sa.DateTime(timezone=True)),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    sa.Index("ix_transfers_call_id", "call_id"),
    # /metrics counts the transfers under way at every scrape: an index of those alone (migration 6).
    sa.Index("ix_transfers_live", "kind", "created_at", sqlite_where=sa.text("active_call_id IS NOT NULL"),
             postgresql_where=sa.text("active_call_id IS NOT NULL")),
)


# Durable work (migration 6): timers, and later deliveries and campaign dispatch. A row is due at
# `due_at`; a process claims it by setting `lease_until` (row locks keep two from claiming the same
# row); a process that dies holding a lease loses it when the lease runs out, and another claims it.
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("kind", sa.String(64), nullable=False),
    # At most one job per key: a timer armed twice (two deliveries of one event) is one timer.
    sa.Column("key", sa.String(255), unique=True),
    sa.Column("payload", sa.Text, nullable=False),  # JSON
    sa.Column("status", sa.String(16), nullable=False),  # pending | running | failed (done rows are deleted)
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    # Counts claims; a claim's count is its fencing token (a late finisher cannot touch a re-claimed row).
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # (Migration 8.) Asked for again while it ran: run once more when this run is done, instead of
    # being deleted (new work for a job that had just read what there was to do).
    sa.Column("rerun", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_jobs_status_due", "status", "due_at"),
)


# Events for the user's systems (migration 8): written in the transaction of the change that caused
# them (an outbox), one delivery per endpoint, delivered by durable work in order per call.
events = sa.Table(
    "events",
    metadata,
    # The order events happened in; deliveries of one call go out in this order.
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),  # the webhook-id, the same on every attempt
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("call_id", sa.String(36)),
    # At most one event per key (call.ended once per call, however often its job runs).
    sa.Column("key", sa.String(255), unique=True),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # the JSON sent, byte for byte on every attempt
    sa.Index("ix_events_call", "call_id", "seq"),
    sa.Index("ix_events_type", "type", "seq"),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("event_seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), sa.ForeignKey("events.seq"),
              nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    # Deliveries of one stream (a call, or an event of no call) go out one at a time, in event order.
    sa.Column("stream", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | delivered | failed | skipped
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("last_attempt_at", sa.DateTime(timezone=True)),
    sa.Column("delivered_at", sa.DateTime(timezone=True)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # (Migration 10.) Deliveries are claimed directly by each endpoint's dispatcher: a pending
    # delivery is due at `due_at` (its next attempt; NULL while an earlier delivery of its stream is
    # pending), and a process sending it holds it until `lease_until` (a process that dies holding
    # it loses it then, and another sends it again).
    sa.Column("due_at", sa.DateTime(timezone=True)),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("event_seq", "endpoint", name="uq_deliveries_event_endpoint"),
    sa.Index("ix_deliveries_stream", "endpoint", "stream", "status", "event_seq"),
    # (ix_deliveries_status, on status and event_seq, went in migration 14: nothing needs it once
    # the queries of pending deliveries read ix_deliveries_due, and it cost an inbound call with an
    # endpoint 0.8 pages of WAL on SQLite, of 21.)
    # What a dispatcher's claim reads: its endpoint's pending deliveries by due time (a small index,
    # since settled deliveries leave it).
    sa.Index("ix_deliveries_due", "endpoint", "due_at", sqlite_where=sa.text("status = 'pending'"),
             postgresql_where=sa.text("status = 'pending'")),
)

delivery_attempts = sa.Table(
    "delivery_attempts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("delivery_id", sa.String(36), sa.ForeignKey("deliveries.id"), nullable=False),
    sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status_code", sa.Integer),  # None: no answer (refused, timed out)
    sa.Column("error", sa.Text),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Index("ix_delivery_attempts_delivery", "delivery_id", "id"),
)

# What the gateway learnt about an endpoint: a 410 disables it until someone enables it again.
webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("disabled_at", sa.DateTime(timezone=True)),
    sa.Column("disabled_reason", sa.Text),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


# Campaigns (migration 9): call lists dialled by durable work. A row is claimed (pending -> dialing)
# by a compare-and-set on its status and attempt count before its call is placed; its attempt's
# idempotency key finds that call again, so a crash between the dial and its record never dials twice.
campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # running | paused | canceled | completed
    sa.Column("api_key_id", sa.String(16), nullable=False),
    sa.Column("spec_json", sa.Text, nullable=False),  # what was asked, rows aside (CampaignSpec)
    sa.Column("starts_at", sa.DateTime(timezone=True)),
    sa.Column("ends_at", sa.DateTime(timezone=True)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    # (Migration 13.) The dispatch rate as a fraction of calls_per_second (NULL: all of it), lowered
    # when Ultravox answers 429/503 and raised again slowly; no dial before held_until (Retry-After).
    # In the row, so every replica's dispatcher paces alike.
    sa.Column("pace", sa.Float),
    sa.Column("held_until", sa.DateTime(timezone=True)),
    sa.Index("ix_campaigns_created", "created_at", "id"),
)

campaign_rows = sa.Table(
    "campaign_rows",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("campaign_id", sa.String(36), sa.ForeignKey("campaigns.id"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),  # order in the list, 0 first
    sa.Column("to_number", sa.Text, nullable=False),
    # Comma-separated IANA zones the window must be open in (the row's own, else the number's).
    sa.Column("timezones", sa.Text, nullable=False),
    sa.Column("template_context_json", sa.Text),
    sa.Column("metadata_json", sa.Text),
    # pending | dialing | a call's final status | suppressed | rejected | expired | canceled
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),  # dials so far
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),  # pending: not before
    sa.Column("attempt_key", sa.String(255)),  # the Idempotency-Key of the current attempt's call
    sa.Column("claimed_at", sa.DateTime(timezone=True)),
    sa.Column("call_id", sa.String(36)),  # the current (or last) attempt's call
    sa.Column("reason", sa.Text),  # why it is rejected, or what the last attempt came to
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("campaign_id", "position", name="uq_campaign_rows_position"),
    sa.Index("ix_campaign_rows_due", "campaign_id", "status", "due_at"),
)

# Numbers never to dial (do-not-call list, opt-outs).
suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("number", sa.String(32), primary_key=True),
    sa.Column("reason", sa.Text),
    sa.Column("source", sa.String(16), nullable=False),  # api | import | opt-out
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


# Signed webhooks seen, kept as long as a replay of one could pass its carrier's signature check
# (migration 11): `key` is a digest of the signature's one-time part (nonce, timestamp|signature).
webhook_replays = sa.Table(
    "webhook_replays",
    metadata,
    sa.Column("carrier", sa.String(16), primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    # The first delivery's answer, given again to a repeat (NULL until it is sent).
    sa.Column("status_code", sa.Integer),
    sa.Column("media_type", sa.String(128)),
    sa.Column("answer", sa.Text),
    sa.Index("ix_webhook_replays_expires", "expires_at"),
)


def _create_v1(connection: sa.Connection) -> None:
    metadata.create_all(connection, tables=[calls])


def _create_transfers(connection: sa.Connection) -> None:
    metadata.create_all(connection, tables=[transfers])


def _create_jobs(connection: sa.Connection) -> None:
    metadata.create_all(connection, tables=[jobs])


def _add_call_columns(**columns: str):
    """A migration adding columns (name=SQL type) to calls; a database created fresh by migration 1
    (from today's table) has them already."""

    def migrate(connection: sa.Connection) -> None:
        existing = {column["name"] for column in sa.inspect(connection).get_columns("calls")}
        for name, sql_type in columns.items():
            if name not in existing:
                connection.execute(sa.text(f"ALTER TABLE calls ADD COLUMN {name} {sql_type}"))

    return migrate


_add_media_columns = _add_call_columns(media_stats="TEXT", recording_path="TEXT")
_add_media_token_column = _add_call_columns(media_token="VARCHAR(64)")
_add_placed_column = _add_call_columns(placed_at="TIMESTAMP WITH TIME ZONE")


def _add_indexes(*names: str):
    """A migration creating indexes of today's tables; a database created fresh has them already.
    (On a large PostgreSQL table, CREATE INDEX blocks writes while it runs: a one-off at upgrade.)"""

    def migrate(connection: sa.Connection) -> None:
        inspector = sa.inspect(connection)
        for table in (calls, transfers):
            existing = {index["name"] for index in inspector.get_indexes(table.name)}
            for index in table.indexes:
                if index.name in names and index.name not in existing:
                    index.create(connection)

    return migrate


_add_live_indexes = _add_indexes("ix_calls_status_created", "ix_transfers_live")


def _create_events(connection: sa.Connection) -> None:
    existing = {column["name"] for column in sa.inspect(connection).get_columns("jobs")}
    if "rerun" not in existing:
        connection.execute(sa.text("ALTER TABLE jobs ADD COLUMN rerun BOOLEAN NOT NULL DEFAULT FALSE"))
    metadata.create_all(connection, tables=[events, deliveries, delivery_attempts, webhook_endpoints])


def _create_campaigns(connection: sa.Connection) -> None:
    metadata.create_all(connection, tables=[campaigns, campaign_rows, suppressions])


def _add_delivery_dispatch(connection: sa.Connection) -> None:
    """Deliveries claimed directly (due time and lease) instead of through one job per stream.
    Deliveries pending from before are due at once; the jobs of the old kind are left to finish
    as no-ops (see flows/events.py)."""
    existing = {column["name"] for column in sa.inspect(connection).get_columns("deliveries")}
    for name, sql_type in (("due_at", "TIMESTAMP WITH TIME ZONE"), ("lease_owner", "VARCHAR(64)"),
                           ("lease_until", "TIMESTAMP WITH TIME ZONE")):
        if name not in existing:
            connection.execute(sa.text(f"ALTER TABLE deliveries ADD COLUMN {name} {sql_type}"))
    # Due: the first pending delivery of each stream; the others wait for it (due_at NULL).
    first = deliveries.alias("first")
    connection.execute(sa.update(deliveries).where(
        deliveries.c.status == "pending",
        deliveries.c.event_seq == sa.select(sa.func.min(first.c.event_seq)).where(
            first.c.endpoint == deliveries.c.endpoint, first.c.stream == deliveries.c.stream,
            first.c.status == "pending").scalar_subquery(),
    ).values(due_at=deliveries.c.created_at))
    if "ix_deliveries_due" not in {index["name"] for index in sa.inspect(connection).get_indexes("deliveries")}:
        next(index for index in deliveries.indexes if index.name == "ix_deliveries_due").create(connection)


def _create_webhook_replays(connection: sa.Connection) -> None:
    metadata.create_all(connection, tables=[webhook_replays])


_add_lease_columns = _add_call_columns(lease_owner="VARCHAR(64)", lease_until="TIMESTAMP WITH TIME ZONE",
                                       stream_expires="BIGINT")


def _add_campaign_pace(connection: sa.Connection) -> None:
    existing = {column["name"] for column in sa.inspect(connection).get_columns("campaigns")}
    for name, sql_type in (("pace", "DOUBLE PRECISION"), ("held_until", "TIMESTAMP WITH TIME ZONE")):
        if name not in existing:
            connection.execute(sa.text(f"ALTER TABLE campaigns ADD COLUMN {name} {sql_type}"))


def _drop_delivery_status_index(connection: sa.Connection) -> None:
    connection.execute(sa.text("DROP INDEX IF EXISTS ix_deliveries_status"))


# Append new migrations; never edit one that has shipped. (Version 1 grew the outbound columns
# before the first release.)
MIGRATIONS = [_create_v1, _create_transfers, _add_media_columns, _add_media_token_column, _add_placed_column,
              _create_jobs, _add_live_indexes, _create_events, _create_campaigns,
              _add_delivery_dispatch, _create_webhook_replays, _add_lease_columns, _add_campaign_pace,
              _drop_delivery_status_index]
