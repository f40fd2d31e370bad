"""Where the store's SQL runs: one function per transaction, written once for both databases.

The store's logic is plain SQLAlchemy Core on a (sync) Connection. PostgreSQL runs it on the
asyncpg engine through `run_sync`, which never blocks the event loop. SQLite has no async
protocol: aiosqlite would move every statement, cursor and commit to its thread and back (four
or more hops a transaction, each waiting for the GIL while the loop is busy), so SQLite runs
the whole transaction in one hop to a thread of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

T = TypeVar("T")
Work = Callable[..., T]

MIGRATION_LOCK_KEY = 0x6761_7465  # any constant shared by every replica of this gateway

# A stalled server or a half-open connection fails a statement instead of hanging it: asyncpg's
# command timeout on each statement (pool pre-pings included), the server's statement timeout,
# bounded connects and pool waits, and TCP keepalives both ways (client side set on the socket:
# asyncpg has no option for it, MagicStack/asyncpg#606). Callers needing a shorter bound (the
# inbound path, see calls.py) put their own deadline in front; these free the connection after.
COMMAND_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 3.0
POOL_TIMEOUT_SECONDS = 3.0
KEEPALIVE_IDLE_SECONDS, KEEPALIVE_INTERVAL_SECONDS, KEEPALIVE_COUNT = 10, 5, 3
SERVER_SETTINGS = {
    "statement_timeout": str(int(COMMAND_TIMEOUT_SECONDS * 1000)),
    "idle_in_transaction_session_timeout": str(int(6 * COMMAND_TIMEOUT_SECONDS * 1000)),
    "tcp_keepalives_idle": str(KEEPALIVE_IDLE_SECONDS),
    "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL_SECONDS),
    "tcp_keepalives_count": str(KEEPALIVE_COUNT),
}


def keep_alive(sock) -> None:
    """Probe an idle connection, and give up on unacknowledged data, within about 25 s (Linux)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECONDS),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT),
                          ("TCP_USER_TIMEOUT", 1000 * (KEEPALIVE_IDLE_SECONDS + KEEPALIVE_INTERVAL_SECONDS * KEEPALIVE_COUNT))):
        if hasattr(socket, option):  # Linux names; elsewhere the system's defaults stand
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


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

    async def transaction(self, work: Work[T], *args: Any, urgent: bool = False) -> T:
        """Run `work(connection, *args)` in a transaction that commits when it returns. `urgent`: a
        caller is waiting on it (the inbound path), so where transactions queue it goes first."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class AsyncPostgres(Database):
    dialect = "postgresql"

    def __init__(self, url: str):
        # Every transaction ends in commit or rollback, so the pool's reset on check-in is a
        # wasted round trip.
        self.engine = create_async_engine(
            url, pool_size=10, max_overflow=20, pool_pre_ping=True, pool_reset_on_return=None,
            pool_timeout=POOL_TIMEOUT_SECONDS,
            connect_args={"command_timeout": COMMAND_TIMEOUT_SECONDS, "timeout": CONNECT_TIMEOUT_SECONDS,
                          "server_settings": SERVER_SETTINGS},
        )

        @sa.event.listens_for(self.engine.sync_engine, "connect")
        def _keepalive(dbapi_connection, _record):
            # asyncpg's Connection keeps its transport private; absent, the server's keepalives remain.
            transport = getattr(dbapi_connection.driver_connection, "_transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                keep_alive(sock)

    async def transaction(self, work: Work[T], *args: Any, urgent: bool = False) -> T:
        # Each transaction has a connection of its own from the pool: none waits behind another here.
        async with self.engine.begin() as connection:
            return await connection.run_sync(work, *args)

    async def close(self) -> None:
        await self.engine.dispose()


# SQLite's automatic checkpoint (at 1000 pages of WAL) runs in the connection that commits past
# them: it copied the WAL into the database file and synced it on the store's one thread, where
# every transaction waited behind it. A thread of its own checkpoints every CHECKPOINT_SECONDS
# instead, on a connection of its own (PASSIVE: it never waits for a writer, nor holds one up, and
# sqlite3 lets go of the GIL meanwhile); the writer's automatic one stays, at a longer WAL, should
# that thread fall behind. (bench: 0.08 to 0.1 ms less of the store thread per inbound call with
# an events endpoint, whose rows are most of the pages written.)
CHECKPOINT_SECONDS = 1.0
BACKSTOP_CHECKPOINT_PAGES = 10000


class ThreadedSQLite(Database):
    dialect = "sqlite"

    URGENT, NORMAL, STOP = 0, 1, 2  # the queue's order: urgent transactions first, then in turn

    def __init__(self, url: str):
        # One thread: SQLite has one writer at a time anyway, and a connection stays on its thread.
        # Its queue lets an urgent transaction (a caller waits on it) pass the background work
        # queued before it (event deliveries, sweeps); the one running finishes first.
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], None]]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._serve, name="sqlite", daemon=True)
        self.engine = sa.create_engine(url, connect_args={"timeout": 5}, pool_reset_on_return=None)

        @sa.event.listens_for(self.engine, "connect")
        def _pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; a power cut may lose the last commit
            cursor.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_CHECKPOINT_PAGES}")
            cursor.close()

        self._thread.start()
        self._checkpoints_stop = threading.Event()
        path = self.engine.url.database
        self._checkpointer = (threading.Thread(target=self._checkpoint, args=(path,), name="sqlite-checkpoint",
                                               daemon=True) if path and path != ":memory:" else None)
        if self._checkpointer is not None:
            self._checkpointer.start()

    async def transaction(self, work: Work[T], *args: Any, urgent: bool = False) -> T:
        return await self._submit(lambda: self._run(work, args), self.URGENT if urgent else self.NORMAL)

    def _run(self, work: Work[T], args: tuple) -> T:
        with self.engine.begin() as connection:
            return work(connection, *args)

    async def _submit(self, call: Callable[[], T], priority: int) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            if future.cancelled():  # its caller gave up before it started: as an executor would, skip it
                return
            try:
                outcome: tuple[Any, BaseException | None] = (call(), None)
            except BaseException as error:  # handed to the caller, as run_in_executor would
                outcome = (None, error)
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # its loop has closed: nobody waits for it, and the thread goes on
                pass

        self._queue.put((priority, next(self._order), run))
        return await future

    def _checkpoint(self, path: str) -> None:
        connection = None
        while not self._checkpoints_stop.wait(CHECKPOINT_SECONDS):
            try:
                if connection is None:  # (mode=rw: never the one to create the file)
                    uri = f"{Path(path).absolute().as_uri()}?mode=rw"
                    connection = sqlite3.connect(uri, uri=True, timeout=0, check_same_thread=False)
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:  # not there yet, or another process is checkpointing: next time
                pass
        if connection is not None:
            connection.close()

    def _serve(self) -> None:
        while True:
            priority, _, run = self._queue.get()
            run()
            if priority == self.STOP:
                return

    async def close(self) -> None:
        # After everything queued: what was asked for is done, then the connections go.
        await self._submit(self.engine.dispose, self.STOP)
        self._thread.join()
        self._checkpoints_stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
