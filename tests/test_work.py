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
        (held,) = await jobs.claim("dead", lease=dt.timedelta(seconds=30), limit=10, kinds=["Ping"], now=clock())
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
        work.register(Ping, lambda job: asyncio.sleep(0))
        assert await work.run_due() == 0  # it claims only the kinds it knows
        (job,) = await jobs.pending()
        assert job.kind == "FromTheFuture" and job.attempts == 0

    run(database_url, scenario)


def test_loops_of_one_table_each_claim_their_own_kinds(database_url):
    @dataclass(frozen=True)
    class Slow:
        number: int

    async def scenario(store):
        jobs = JobStore(store.database)
        calls, deliveries = Work(jobs, batch=2), Work(jobs, batch=2)
        ran: list[str] = []

        async def ping(job: Ping) -> None:
            ran.append(f"ping {job.number}")

        async def slow(job: Slow) -> None:
            ran.append(f"slow {job.number}")

        calls.register(Ping, ping)
        deliveries.register(Slow, slow)
        for number in range(3):
            await deliveries.schedule(Slow(number))
        await calls.schedule(Ping(1))
        assert await calls.run_due() == 1  # the three slow ones before it are not its to claim
        await until(lambda: not calls._running)
        assert ran == ["ping 1"]
        assert await deliveries.run_due() == 2  # its own batch
        await until(lambda: not deliveries._running)
        assert sorted(ran[1:]) == ["slow 0", "slow 1"]

    run(database_url, scenario)


def test_a_handler_that_returns_seconds_runs_again_then(database_url):
    async def scenario(store):
        jobs = JobStore(store.database)
        clock = Clock()
        work = Work(jobs, now=clock)
        runs = []

        async def paced(job: Ping) -> float | None:
            runs.append(job.number)
            return 30.0 if len(runs) < 2 else None

        work.register(Ping, paced, max_attempts=1)
        await work.schedule(Ping(5))
        assert await work.run_due() == 1
        await until(lambda: not work._running)
        (job,) = await jobs.pending()
        assert job.attempts == 0 and 29 < (job.due_at - clock()).total_seconds() <= 30  # not counted as a failure
        assert await work.run_due() == 0
        clock.advance(31)
        assert await work.run_due() == 1
        await until(lambda: not work._running)
        assert runs == [5, 5] and await jobs.pending() == []

    run(database_url, scenario)


def test_a_coalescing_job_asked_for_while_it_runs_runs_once_more(database_url):
    """A stream's delivery job has just read "nothing more to send" when a new event's
    transaction asks for it again: it must run again, not be deleted with the event unsent."""

    async def scenario(store):
        jobs = JobStore(store.database)
        work = Work(jobs)
        started, release = asyncio.Event(), asyncio.Event()
        runs = []

        async def stream(job: Ping) -> None:
            runs.append(job.number)
            if len(runs) == 1:
                started.set()
                await release.wait()

        work.register(Ping, stream)
        job = work.job(Ping(1), key="stream:1", coalesce=True)
        assert await work.add(job)
        assert await work.run_due() == 1
        await started.wait()
        assert await work.add(work.job(Ping(1), key="stream:1", coalesce=True))  # while it runs
        release.set()
        await until(lambda: not work._running)
        (again,) = await jobs.pending()
        assert again.key == "stream:1" and again.due_at <= utcnow()
        assert await work.run_due() == 1
        await until(lambda: not work._running)
        assert runs == [1, 1] and await jobs.pending() == []
        # Waiting: asked for sooner, it is due sooner; asked for later, it keeps its time.
        await work.add(work.job(Ping(2), delay=600, key="stream:2", coalesce=True))
        await work.add(work.job(Ping(2), delay=5, key="stream:2", coalesce=True))
        await work.add(work.job(Ping(2), delay=900, key="stream:2", coalesce=True))
        (waiting,) = await jobs.pending()
        assert 0 < (waiting.due_at - utcnow()).total_seconds() <= 5

    run(database_url, scenario)


# --- the events' rows --------------------------------------------------------------------------------------


def test_events_are_written_once_per_key_and_pruned_once_settled(database_url):
    from gateway.flows.events import Outcome
    from gateway.store.events import DELIVERED, Attempt, EventFilters, EventStore, NewEvent, insert_events

    async def scenario(store):
        events = EventStore(store.database)
        old = utcnow() - dt.timedelta(days=40)
        written = [
            NewEvent("call.ended", {"n": 1}, ("crm",), call_id="c1", key="call.ended:c1", occurred_at=old),
            NewEvent("call.ended", {"n": 2}, ("crm",), call_id="c1", key="call.ended:c1", occurred_at=old),
            NewEvent("call.started", {"n": 3}, ("crm", "bi"), call_id="c2", occurred_at=old),
            NewEvent("call.started", {"n": 4}, ("crm",), call_id="c3"),
        ]
        streams = await store.database.transaction(insert_events, written)
        assert streams == {("crm", "c1"), ("crm", "c2"), ("bi", "c2"), ("crm", "c3")}
        found, more = await events.list(EventFilters(), limit=10, before_seq=None)
        assert [e.envelope["data"]["n"] for e in found] == [4, 3, 1] and not more  # the repeated key: once
        claimed = await events.claim("crm", "me", lease=dt.timedelta(seconds=30), limit=10)
        assert sorted(p.body for p in claimed) == sorted(e.body() for e in written if e.id != written[1].id)
        (first,) = [p for p in claimed if p.event_id == written[0].id]
        delivered = Outcome(first, Attempt(utcnow(), 200, None, 3), DELIVERED)
        await events.attempted("me", [delivered])
        await events.attempted("me", [delivered])  # fenced: recorded once (the attempt is kept twice)
        (delivery,) = (await events.get(first.event_id)).deliveries
        assert (delivery.status, delivery.attempts, len(delivery.history)) == (DELIVERED, 1, 2)
        # Old and settled (c1) goes; old with a delivery pending (c2) stays; recent (c3) stays.
        assert await events.prune(utcnow() - dt.timedelta(days=30)) == 1
        found, _ = await events.list(EventFilters(), limit=10, before_seq=None)
        assert [e.envelope["data"]["n"] for e in found] == [4, 3]
        (pending,) = (await events.list(EventFilters(delivery_status="pending", endpoint="bi"), limit=10,
                                        before_seq=None))[0]
        assert pending.call_id == "c2"

    run(database_url, scenario)


def test_a_running_jobs_lease_is_renewed_so_no_one_else_claims_it(database_url):
    async def scenario(store):
        jobs = JobStore(store.database)
        holder, other = Work(jobs, owner="holder", lease_seconds=0.6), Work(jobs, owner="other", lease_seconds=0.6)
        release, runs = asyncio.Event(), []

        async def long(job: Ping) -> None:
            runs.append(job.number)
            await release.wait()

        holder.register(Ping, long)
        other.register(Ping, long)
        await holder.start()
        try:
            await holder.schedule(Ping(1))
            await until(lambda: runs == [1])
            for _ in range(8):  # well past the 0.6 s lease: the holder keeps renewing it
                await asyncio.sleep(0.2)
                assert await other.run_due() == 0
            release.set()
            await until(lambda: not holder._running)
            assert runs == [1] and await jobs.pending() == []
        finally:
            release.set()
            await holder.stop()
            await other.stop()

    run(database_url, scenario)


def test_deliveries_are_claimed_by_the_heads_of_their_streams_one_holder_at_a_time(database_url):
    """A stream's next delivery is claimable only once its head is recorded; a claim's lease keeps
    others off until it runs out; a holder whose lease ran out, or whose delivery was asked for
    again meanwhile, records nothing over the newer state."""
    from gateway.flows.events import Outcome
    from gateway.store.events import (
        DELIVERED, FAILED, PENDING, Attempt, EventStore, NewEvent, insert_events, redeliver,
    )

    lease = dt.timedelta(seconds=30)

    async def scenario(store):
        events = EventStore(store.database)

        async def state(event):
            (delivery,) = (await events.get(event.id)).deliveries
            return delivery.status, delivery.attempts

        a1, a2, a3 = (NewEvent("call.status_changed", {"n": n}, ("crm",), call_id="a") for n in (1, 2, 3))
        b1 = NewEvent("call.started", {"n": 4}, ("crm",), call_id="b")
        await store.database.transaction(insert_events, [a1, a2, b1])
        await store.database.transaction(insert_events, [a3])

        def outcome(pending, status=DELIVERED, retry_at=None):
            return Outcome(pending, Attempt(utcnow(), 200 if status == DELIVERED else 500, None, 1), status,
                           retry_at=retry_at)

        heads = await events.claim("crm", "p1", lease=lease, limit=10)
        assert [p.event_id for p in heads] == [a1.id, b1.id]  # one per stream: its first
        assert await events.claim("crm", "p2", lease=lease, limit=10) == []  # held, and the rest wait behind them
        (head_a, head_b) = heads
        # a1 fails and waits for a retry: a2 and a3 stay behind it; b's stream is done.
        later = utcnow() + dt.timedelta(minutes=5)
        await events.attempted("p1", [outcome(head_a, PENDING, later), outcome(head_b)])
        assert (await state(a1), await state(b1)) == ((PENDING, 1), (DELIVERED, 1))
        assert await events.claim("crm", "p2", lease=lease, limit=10) == []
        assert await events.expedite("crm") == 1  # the endpoint answers again: due now
        (again,) = await events.claim("crm", "p2", lease=lease, limit=10)
        assert again.event_id == a1.id and again.attempts == 1
        # p2 dies holding it; once its lease has run out, p3 claims it, and p2's late record changes nothing.
        (taken,) = await events.claim("crm", "p3", lease=lease, limit=10, now=utcnow() + lease * 2)
        assert taken.event_id == a1.id
        await events.attempted("p2", [outcome(again)])
        assert await state(a1) == (PENDING, 1)
        await events.attempted("p3", [outcome(taken)])
        assert await state(a1) == (DELIVERED, 2)
        (second,) = await events.claim("crm", "p3", lease=lease, limit=10)
        assert second.event_id == a2.id
        # Asked for again while being sent: the send's record is fenced off, and it goes again.
        await store.database.transaction(redeliver, a2.id, ["crm"])
        await events.attempted("p3", [outcome(second)])
        assert await state(a2) == (PENDING, 0)
        (resent,) = await events.claim("crm", "p1", lease=lease, limit=10)
        assert resent.event_id == a2.id and resent.attempts == 0
        await events.attempted("p1", [outcome(resent, FAILED)])  # given up: the stream moves on
        assert await state(a2) == (FAILED, 1)
        (last,) = await events.claim("crm", "p1", lease=lease, limit=10)
        assert last.event_id == a3.id

    run(database_url, scenario)


def test_two_processes_claiming_deliveries_at_once_never_hold_the_same_one(database_url):
    from gateway.store.events import EventStore, NewEvent, insert_events

    lease = dt.timedelta(seconds=30)

    async def scenario(store):
        events = EventStore(store.database)
        written = [NewEvent("call.started", {"n": n}, ("crm",), call_id=f"c{n}") for n in range(60)]
        await store.database.transaction(insert_events, written)
        other = CallStore.open(database_url)  # a second process's connections
        try:
            claims = await asyncio.gather(*(
                EventStore(s.database).claim("crm", owner, lease=lease, limit=25)
                for _ in range(3) for s, owner in ((store, "p1"), (other, "p2"))))
        finally:
            await other.close()
        held = [p.delivery_id for claim in claims for p in claim]
        assert len(held) == len(set(held)) == 60  # each once, all of them
        assert await events.claim("crm", "p3", lease=lease, limit=100) == []

    run(database_url, scenario)
