"""Durable work on SQLite and PostgreSQL: due jobs run once across processes, a dead holder's jobs
run again after its lease, retries, periodic jobs."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

from gateway.store import CallStore
from gateway.store.calls import utcnow
from gateway.store.jobs import JobStore, NewJob
from gateway.work import Work

from .test_store import run


@dataclass(frozen=True)
class Ping:
    number: int


@dataclass(frozen=True)
class Sweep:
    pass


class Clock:
    """utcnow, moved forward on demand: retries and periodic runs fall due without waiting."""

    def __init__(self):
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return utcnow() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += dt.timedelta(seconds=seconds)


async def until(condition, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_each_due_job_runs_once_with_two_processes_claiming(database_url):
    async def scenario(store):
        other = CallStore.open(database_url)  # a second process: its own connections
        ran: list[tuple[str, int]] = []

        def worker(name, jobs):
            work = Work(jobs, owner=name, poll_seconds=0.05)

            async def ping(job: Ping) -> None:
                await asyncio.sleep(0.001)
                ran.append((name, job.number))

            work.register(Ping, ping)
            return work

        first, second = worker("first", JobStore(store.database)), worker("second", JobStore(other.database))
        await asyncio.gather(*(first.schedule(Ping(n)) for n in range(60)))
        await asyncio.gather(first.start(), second.start())
        try:
            await until(lambda: len(ran) >= 60)
            await asyncio.sleep(0.2)  # time for a second run of anything, if there were one
        finally:
            await asyncio.gather(first.stop(), second.stop())
            await other.close()
        assert sorted(number for _, number in ran) == list(range(60))
        assert await JobStore(store.database).pending() == []

    run(database_url, scenario)


def test_a_dead_holders_job_runs_again_after_its_lease_and_its_late_finish_changes_nothing(database_url):
    async def scenario(store):
        jobs = JobStore(store.database)
        clock = Clock()
        work = Work(jobs, owner="alive", now=clock)
        ran = []

        async def ping(job: Ping) -> None:
            ran.append(job.number)

        work.register(Ping, ping)
        await work.schedule(Ping(7))
        # A process claims it and dies before finishing.
        (held,) = await jobs.claim("dead", lease=dt.timedelta(seconds=30), limit=10, now=clock())
        assert await work.run_due() == 0  # held, and the lease still runs
        clock.advance(31)
        assert await work.run_due() == 1
        await until(lambda: ran == [7])
        await until(lambda: not work._running)
        assert await jobs.pending() == []
        assert not await jobs.done(held)  # the dead process's claim is stale: it removes nothing

    run(database_url, scenario)


def test_a_key_arms_one_timer(database_url):
    async def scenario(store):
        work = Work(JobStore(store.database))
        work.register(Ping, lambda job: asyncio.sleep(0))
        assert await work.schedule(Ping(1), delay=60, key="leg:1")
        assert not await work.schedule(Ping(2), delay=60, key="leg:1")
        (job,) = await work.jobs.pending()
        assert job.payload == {"number": 1}

    run(database_url, scenario)


def test_a_failing_job_is_retried_later_then_given_up(database_url):
    async def scenario(store):
        jobs = JobStore(store.database)
        clock = Clock()
        work = Work(jobs, now=clock)
        attempts = []

        async def flaky(job: Ping) -> None:
            attempts.append(job.number)
            raise ConnectionError("carrier down")

        work.register(Ping, flaky, max_attempts=2)
        await work.schedule(Ping(3))
        assert await work.run_due() == 1
        await until(lambda: not work._running)
        assert attempts == [3]
        assert await work.run_due() == 0  # not due again yet: it backs off
        clock.advance(2)
        assert await work.run_due() == 1
        await until(lambda: not work._running)
        assert attempts == [3, 3]
        clock.advance(3600)
        assert await work.run_due() == 0  # given up after max_attempts, kept for inspection
        ((status, error),) = await store.database.transaction(
            lambda connection: connection.exec_driver_sql("SELECT status, last_error FROM jobs").all())
        assert status == "failed" and "carrier down" in error

    run(database_url, scenario)


def test_a_periodic_job_has_one_row_and_runs_again_each_period(database_url):
    async def scenario(store):
        other = CallStore.open(database_url)
        clock = Clock()
        runs = []

        async def sweep(job: Sweep) -> None:
            runs.append(job)

        def worker(jobs):
            work = Work(jobs, now=clock)
            work.register(Sweep, sweep, every=30)
            return work

        first, second = worker(JobStore(store.database)), worker(JobStore(other.database))
        try:
            for work in (first, second):  # both processes start: one row between them
                await work.seed_periodic()
            assert len(await first.jobs.pending()) == 1
            assert await first.run_due() + await second.run_due() == 1
            await until(lambda: not first._running and not second._running)
            assert await first.run_due() + await second.run_due() == 0
            clock.advance(31)
            assert await first.run_due() + await second.run_due() == 1
            await until(lambda: not first._running and not second._running)
            assert len(runs) == 2 and len(await first.jobs.pending()) == 1
        finally:
            await other.close()

    run(database_url, scenario)


def test_a_job_this_version_does_not_know_is_left_for_one_that_does(database_url):
    async def scenario(store):
        jobs = JobStore(store.database)
        await jobs.schedule(NewJob("FromTheFuture", {"x": 1}, utcnow()))
        work = Work(jobs)
        assert await work.run_due() == 1
        await until(lambda: not work._running)
        (job,) = await jobs.pending()
        assert job.kind == "FromTheFuture" and job.attempts == 1 and job.due_at > utcnow()

    run(database_url, scenario)
