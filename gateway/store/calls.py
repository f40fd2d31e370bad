"""Call records in SQLite (default) or PostgreSQL, through SQLAlchemy's async engine."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, fields

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .schema import MIGRATIONS, calls, schema_version

MIGRATION_LOCK_KEY = 0x6761_7465  # any constant shared by every replica of this gateway

# Inbound call statuses.
CREATING = "creating"  # the Ultravox call is being created for this carrier call
CONNECTED = "connected"  # the carrier got XML joining the Ultravox call
FAILED = "failed"  # the caller got the apology
REJECTED = "rejected"  # no route for the called number


@dataclass(frozen=True)
class CallRecord:
    id: str
    direction: str
    carrier: str
    carrier_call_id: str
    from_number: str
    to_number: str
    route: str | None
    ultravox_call_id: str | None
    join_url: str | None
    status: str
    failure_reason: str | None
    attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime


_COLUMNS = [f.name for f in fields(CallRecord)]


@dataclass(frozen=True)
class Claim:
    record: CallRecord
    owned: bool  # True: this caller must create the Ultravox call; False: someone else did or is


def async_database_url(url: str) -> str:
    """Accept the plain URLs people write and pick the async driver for them."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    return url


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _as_utc(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _record(row: sa.Row) -> CallRecord:
    data = dict(row._mapping)
    data["created_at"] = _as_utc(data["created_at"])
    data["updated_at"] = _as_utc(data["updated_at"])
    return CallRecord(**{name: data[name] for name in _COLUMNS})


class CallStore:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    @classmethod
    def open(cls, database_url: str) -> "CallStore":
        url = async_database_url(database_url)
        # Every use ends its own transaction (begin() commits, connect() rolls back on close), so
        # the pool's extra rollback on check-in is a wasted round trip per statement.
        options: dict = {"pool_reset_on_return": None}
        if url.startswith("sqlite"):
            # One connection per task would contend on SQLite's single writer; WAL plus a busy
            # timeout lets readers and the writer overlap.
            options["connect_args"] = {"timeout": 5}
        else:
            options.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        engine = create_async_engine(url, **options)
        if url.startswith("sqlite"):
            @sa.event.listens_for(engine.sync_engine, "connect")
            def _sqlite_pragmas(dbapi_connection, _record):
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.close()
        return cls(engine)

    async def migrate(self) -> int:
        """Create or upgrade the schema; returns the version now in place."""
        async with self.engine.begin() as connection:
            if self.engine.dialect.name == "postgresql":
                # Replicas starting together must not both run the same migration.
                await connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            return await connection.run_sync(_migrate)

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))

    async def close(self) -> None:
        await self.engine.dispose()

    # --- inbound calls ------------------------------------------------------------------------------
    async def claim_inbound(
        self,
        *,
        carrier: str,
        carrier_call_id: str,
        from_number: str,
        to_number: str,
        route: str | None,
        status: str = CREATING,
        failure_reason: str | None = None,
        stale_after: dt.timedelta,
    ) -> Claim:
        """Record a carrier call once. The first delivery owns it; retries see the first record.

        A record left `failed`, or `creating` for longer than `stale_after` (its owner died), is
        handed to the next delivery so a carrier retry gets a fresh attempt.
        """
        now = utcnow()
        values = dict(
            id=str(uuid.uuid4()),
            direction="inbound",
            carrier=carrier,
            carrier_call_id=carrier_call_id,
            from_number=from_number,
            to_number=to_number,
            route=route,
            status=status,
            failure_reason=failure_reason,
            attempts=1,
            created_at=now,
            updated_at=now,
        )
        insert = self._insert(calls).values(**values).on_conflict_do_nothing(
            index_elements=["carrier", "carrier_call_id"]
        )
        async with self.engine.begin() as connection:
            inserted = (await connection.execute(insert)).rowcount == 1
            if inserted:
                return Claim(CallRecord(join_url=None, ultravox_call_id=None, **values), owned=True)
            row = (await connection.execute(
                sa.select(calls).where(calls.c.carrier == carrier, calls.c.carrier_call_id == carrier_call_id)
            )).one()
            existing = _record(row)
            retryable = existing.status == FAILED or (
                existing.status == CREATING and now - existing.updated_at > stale_after
            )
            if status != CREATING or not retryable:
                return Claim(existing, owned=False)
            # Compare-and-set on the attempt count: of two racing retries only one takes it over.
            taken = await connection.execute(
                sa.update(calls)
                .where(calls.c.id == existing.id, calls.c.attempts == existing.attempts)
                .values(status=CREATING, failure_reason=None, attempts=calls.c.attempts + 1, updated_at=now)
            )
            if taken.rowcount != 1:
                # Another delivery took it over just now: hand back its state, not the stale one.
                return Claim(await self._get(connection, existing.id), owned=False)
            return Claim(await self._get(connection, existing.id), owned=True)

    async def mark_connected(self, call_id: str, *, ultravox_call_id: str, join_url: str) -> None:
        await self._update(call_id, status=CONNECTED, ultravox_call_id=ultravox_call_id, join_url=join_url)

    async def mark_failed(self, call_id: str, reason: str) -> None:
        await self._update(call_id, status=FAILED, failure_reason=reason[:500])

    async def get(self, call_id: str) -> CallRecord | None:
        async with self.engine.connect() as connection:
            return await self._get(connection, call_id)

    async def list_all(self) -> list[CallRecord]:
        async with self.engine.connect() as connection:
            rows = (await connection.execute(sa.select(calls).order_by(calls.c.created_at))).all()
        return [_record(row) for row in rows]

    async def _update(self, call_id: str, **values) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                sa.update(calls).where(calls.c.id == call_id).values(updated_at=utcnow(), **values)
            )

    @staticmethod
    async def _get(connection, call_id: str) -> CallRecord | None:
        row = (await connection.execute(sa.select(calls).where(calls.c.id == call_id))).first()
        return _record(row) if row else None


def _migrate(connection: sa.Connection) -> int:
    schema_version.create(connection, checkfirst=True)
    applied = connection.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
    for version, migration in enumerate(MIGRATIONS, start=1):
        if version > applied:
            migration(connection)
            connection.execute(schema_version.insert().values(version=version, applied_at=utcnow()))
    return len(MIGRATIONS)
