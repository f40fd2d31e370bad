"""Durable work: timers and periodic sweeps as rows, run by whichever process claims them.

Every process runs a `Work` loop. A job is scheduled as a row with a due time; when it is due, one
process claims it (a lease, renewed every few seconds while the handler runs), runs its handler and
deletes the row. A process that dies holding a lease loses it within seconds, when it runs out
unrenewed, and another process runs the job again; so handlers must be
idempotent (they re-read what they act on and act only if it still holds). Nothing waits in an
asyncio task that a crash would lose: the row is the timer.

A job's payload is a frozen dataclass of its own type; each type is registered once with its
handler, and the type's name (`kind`) is what the row stores. A handler that returns a number
of seconds asks to run again that much later (work it paces itself, like webhook deliveries
backing off); one that raises is retried on the schedule below.

A process may run several loops over the one table, each claiming only the kinds registered
with it: slow work (deliveries to the user's endpoints) then never holds the slots of work that
a caller waits for (a transfer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, TypeVar

from .logs import CONTEXT_FIELDS, bind
from .store.calls import utcnow
from .store.jobs import Job, JobStore, NewJob

log = logging.getLogger("gateway.work")

P = TypeVar("P")

# A lease this long, renewed a third of the way through: a job held by a process that died is
# claimable again within it (a caller on hold, an event owed, waits that much longer at most).
LEASE_SECONDS = 15.0
MAX_RUN_SECONDS = 50.0  # a handler running longer is cancelled and retried (they bound remote calls to ~10 s)
POLL_SECONDS = 1.0  # how soon a job scheduled by another process, or left by a dead one, is seen
BATCH = 16  # jobs claimed at once by one process
RETRY_SECONDS = (1, 5, 30, 120, 600)  # after the 1st, 2nd, … failure


@dataclass(frozen=True)
class JobKind(Generic[P]):
    name: str
    payload_type: type[P]
    run: Callable[[P], Awaitable[float | None]]
    max_attempts: int
    every: dt.timedelta | None  # periodic: runs again this long after each run


def process_name() -> str:
    """Who holds a lease: host, process and a random part (a restarted process is someone else)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Work:
    def __init__(self, jobs: JobStore, *, owner: str | None = None, lease_seconds: float = LEASE_SECONDS,
                 poll_seconds: float = POLL_SECONDS, batch: int = BATCH, now: Callable[[], dt.datetime] = utcnow):
        self.jobs = jobs
        self.batch = batch
        self.owner = owner or process_name()
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.poll_seconds = poll_seconds
        self._now = now
        self._kinds: dict[str, JobKind] = {}
        self._by_type: dict[type, JobKind] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._running: dict[asyncio.Task, Job] = {}
        self._stopping = False
        self._more_due = False

    # --- what there is to do -------------------------------------------------------------------------
    def register(self, payload_type: type[P], run: Callable[[P], Awaitable[float | None]], *, max_attempts: int = 5,
                 every: float | None = None) -> None:
        """`run(payload)` is what a job of `payload_type` does; `every` seconds makes it periodic."""
        if not dataclasses.is_dataclass(payload_type):
            raise TypeError(f"{payload_type.__name__} must be a dataclass")
        kind = JobKind(payload_type.__name__, payload_type, run, max_attempts,
                       dt.timedelta(seconds=every) if every else None)
        if kind.name in self._kinds:
            raise ValueError(f"a job kind named {kind.name} is registered already")
        self._kinds[kind.name] = self._by_type[payload_type] = kind

    def job(self, payload: Any, *, delay: float = 0.0, key: str | None = None, coalesce: bool = False) -> NewJob:
        """The row that runs `payload`'s handler `delay` seconds from now, on whichever process
        claims it first; for a store transaction to write along with what it implies (`wake` after).
        `key`, `coalesce`: see NewJob."""
        kind = self._by_type[type(payload)]
        return NewJob(kind.name, dataclasses.asdict(payload), self._now() + dt.timedelta(seconds=delay), key, coalesce)

    async def schedule(self, payload: Any, *, delay: float = 0.0, key: str | None = None) -> bool:
        """Schedule `payload` (see `job`) on its own. With a `key`, a job already scheduled under it
        stands (False)."""
        return await self.add(self.job(payload, delay=delay, key=key))

    async def add(self, job: NewJob) -> bool:
        scheduled = await self.jobs.schedule(job)
        self.wake()
        return scheduled

    def wake(self) -> None:
        """Look for due work now (a job was just written)."""
        self._wake.set()

    # --- running it ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.seed_periodic()
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="work")
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat(), name="work-leases")

    async def seed_periodic(self) -> None:
        """One row per periodic job, whichever process seeds it first; due at once."""
        for kind in self._kinds.values():
            if kind.every is not None:
                await self.jobs.schedule(NewJob(kind.name, {}, self._now(), key=f"every:{kind.name}"))

    async def stop(self, timeout: float = 10.0) -> None:
        """Claim nothing more; let running jobs finish for up to `timeout` (leases cover the rest)."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._running:
            _, unfinished = await asyncio.wait(set(self._running), timeout=timeout)
            for task in unfinished:
                task.cancel()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task

    async def run_due(self) -> int:
        """Claim what is due now and start it; returns how many jobs were started."""
        free = self.batch - len(self._running)
        if free <= 0 or self._stopping or not self._kinds:
            return 0
        claimed = await self.jobs.claim(self.owner, lease=self.lease, limit=free, kinds=list(self._kinds),
                                        now=self._now())
        # Every free slot taken: more may be due, to claim as slots free up. Else all that was due
        # runs now, and a finishing job needs no new look (a claim and a next-due query each time).
        self._more_due = len(claimed) == free
        for job in claimed:
            task = asyncio.get_running_loop().create_task(self._run(job), name=f"job:{job.kind}")
            self._running[task] = job
            task.add_done_callback(self._finished)
        return len(claimed)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.pop(task, None)
        if self._more_due:
            self._wake.set()  # a slot is free for what waits

    async def _heartbeat(self) -> None:
        """Renew the leases of the jobs running here, in one statement, a third of a lease apart."""
        every = self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(every)
            held = list(self._running.values())
            if not held:
                continue
            try:
                await self.jobs.renew(self.owner, held, until=self._now() + self.lease)
            except Exception:
                log.exception("durable work: renewing %d lease(s) failed; trying again", len(held))

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                claimed = await self.run_due()
                # Jobs started: each wakes the loop as it finishes (and a job written meanwhile, its
                # writer). Nothing due: sleep until the next is.
                wait = self.poll_seconds if claimed or len(self._running) >= self.batch else await self._until_next()
            except Exception:
                log.exception("durable work: claiming failed; trying again")
                wait = self.poll_seconds
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    async def _until_next(self) -> float:
        due = await self.jobs.next_due(list(self._kinds))
        if due is None:
            return self.poll_seconds
        # (A due job just claimed by another process still shows as pending for an instant: no spin.)
        return min(self.poll_seconds, max(0.01, (due - self._now()).total_seconds()))

    async def _run(self, job: Job) -> None:
        # A task of its own: the ids its payload names (transfer_id…) go on the lines it logs.
        bind(**{name: value for name, value in job.payload.items() if name in CONTEXT_FIELDS and isinstance(value, str)})
        kind = self._kinds[job.kind]  # claimed by kind (a newer version's kinds wait for a newer process)
        try:
            later = await asyncio.wait_for(kind.run(kind.payload_type(**job.payload)),
                                           timeout=MAX_RUN_SECONDS)
        except asyncio.CancelledError:
            raise  # stopping: the lease runs out and another process runs it
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            if job.attempts >= kind.max_attempts and kind.every is None:
                log.error("job %s (%s) failed %d times, giving up: %s", job.id, job.kind, job.attempts, reason)
                await self.jobs.failed(job, reason)
            else:
                log.warning("job %s (%s) failed (attempt %d): %s", job.id, job.kind, job.attempts, reason,
                            exc_info=error)
                delay: float = RETRY_SECONDS[min(job.attempts, len(RETRY_SECONDS)) - 1]
                if kind.every is not None:
                    delay = max(delay, kind.every.total_seconds())
                await self.jobs.again(job, self._now() + dt.timedelta(seconds=delay), reason)
            return
        if later is not None:
            await self.jobs.again(job, self._now() + dt.timedelta(seconds=later))
            if later < self.poll_seconds:
                self.wake()
        elif kind.every is not None:
            await self.jobs.again(job, self._now() + kind.every)
        elif not await self.jobs.done(job):
            self.wake()  # asked for while it ran: it is due again now
