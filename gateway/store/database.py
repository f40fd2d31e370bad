"""Where the store's SQL runs: one function per transaction, written once for both databases.

The store's logic is plain SQLAlchemy Core on a (sync) Connection. PostgreSQL runs it on the
asyncpg engine through `run_sync`, which never blocks the event loop. SQLite has no async
protocol: aiosqlite would move every statement, cursor and commit to its thread and back (four
or more hops a transaction, each waiting for the GIL while the loop is busy), so SQLite runs
the whole transaction in one hop to a thread of its own.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

T = TypeVar("T")
Work = Callable[..., T]

MIGRATION_LOCK_KEY = 0x6761_7465  # any constant shared by every replica of this gateway


def engine_url(url: str) -> str:
    """Accept the plain URLs people write; PostgreSQL goes through asyncpg."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    return url


class Database:
    dialect: str

    @staticmethod
    def open(url: str) -> "Database":
        url = engine_url(url)
        return ThreadedSQLite(url) if url.startswith("sqlite") else AsyncPostgres(url)

    async def transaction(self, work: Work, *args: Any) -> T:
        """Run `work(connection, *args)` in a transaction that commits when it returns."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class AsyncPostgres(Database):
    dialect = "postgresql"

    def __init__(self, url: str):
        # Every transaction ends in commit or rollback, so the pool's reset on check-in is a
        # wasted round trip.
        self.engine = create_async_engine(
            url, pool_size=10, max_overflow=20, pool_pre_ping=True, pool_reset_on_return=None
        )

    async def transaction(self, work: Work, *args: Any) -> T:
        async with self.engine.begin() as connection:
            return await connection.run_sync(work, *args)

    async def close(self) -> None:
        await self.engine.dispose()


class ThreadedSQLite(Database):
    dialect = "sqlite"

    def __init__(self, url: str):
        # One thread: SQLite has one writer at a time anyway, and a connection stays on its thread.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self.engine = sa.create_engine(url, connect_args={"timeout": 5}, pool_reset_on_return=None)

        @sa.event.listens_for(self.engine, "connect")
        def _pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; a power cut may lose the last commit
            cursor.close()

    async def transaction(self, work: Work, *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._run, work, args)

    def _run(self, work: Work, args: tuple) -> T:
        with self.engine.begin() as connection:
            return work(connection, *args)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self.engine.dispose)
        self._thread.shutdown(wait=True)
