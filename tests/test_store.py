"""The call store on SQLite and on PostgreSQL: one claim per carrier call, also under races."""

from __future__ import annotations

import asyncio
import os
import datetime as dt


from gateway.store import IN_PROGRESS, CREATING, FAILED, REJECTED, CallStore
from gateway.store import TransferStore
from gateway.store.calls import live_calls_query
from gateway.store.transfers import FAILED as TRANSFER_FAILED, live_transfers_query
from gateway.store.database import engine_url
from gateway.store.schema import MIGRATIONS

STALE = dt.timedelta(seconds=30)


def run(database_url, scenario):
    async def main():
        store = CallStore.open(database_url)
        try:
            await store.migrate()
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())


def claim(store, call_id="CA1", **kwargs):
    values = dict(carrier="twilio", carrier_call_id=call_id, from_number="+15551230001",
                  to_number="+15550001111", route="support", stale_after=STALE)
    values.update(kwargs)
    return store.claim_inbound(**values)


def test_first_delivery_owns_the_call_and_retries_see_its_record(database_url):
    async def scenario(store):
        first = await claim(store)
        assert first.owned and first.record.status == CREATING
        await store.mark_connected(first.record.id, ultravox_call_id="uv-1", join_url="wss://x/1?a=1&b=2")
        second = await claim(store)
        assert not second.owned
        assert second.record.id == first.record.id
        assert second.record.status == IN_PROGRESS and second.record.join_url == "wss://x/1?a=1&b=2"
        assert second.record.created_at.tzinfo is not None
        assert len(await store.list_all()) == 1

    run(database_url, scenario)


def test_racing_claims_have_exactly_one_owner(database_url):
    async def scenario(store):
        claims = await asyncio.gather(*(claim(store) for _ in range(12)))
        assert sum(c.owned for c in claims) == 1
        assert len({c.record.id for c in claims}) == 1

    run(database_url, scenario)


def test_a_failed_call_is_taken_over_by_one_retry(database_url):
    async def scenario(store):
        first = await claim(store)
        await store.mark_failed(first.record.id, "Ultravox answered 500")
        retries = await asyncio.gather(*(claim(store) for _ in range(5)))
        owners = [c for c in retries if c.owned]
        assert len(owners) == 1
        assert owners[0].record.attempts == 2 and owners[0].record.status == CREATING
        assert owners[0].record.failure_reason is None

    run(database_url, scenario)


def test_a_creating_record_past_its_lease_is_settled_not_taken_over(database_url):
    """Its Ultravox call may exist (the owner died after creating it): a claim never retakes it;
    a settle does, once, however many replicas try."""
    from gateway.store.calls import utcnow

    async def scenario(store):
        first = await claim(store, stale_after=dt.timedelta(seconds=-1))  # its lease lapsed at once
        assert first.record.lease_until is not None
        again = await claim(store)
        assert not again.owned and again.record.status == CREATING
        (lapsed,) = await store.lapsed_creating(now=utcnow(), stale_after=dt.timedelta(seconds=15))
        assert lapsed.id == first.record.id
        tries = await asyncio.gather(*(store.settle_creating(lapsed, retake_for=f"p{n}", lease=dt.timedelta(seconds=15))
                                       for n in range(5)))
        (taken,) = [t for t in tries if t.owned]
        assert taken.record.attempts == 2 and taken.record.lease_owner in {f"p{n}" for n in range(5)}
        assert await store.lapsed_creating(now=utcnow(), stale_after=dt.timedelta(seconds=15)) == []

    run(database_url, scenario)


def test_rejected_calls_are_recorded_once_and_never_taken_over(database_url):
    async def scenario(store):
        rejected = await claim(store, route=None, status=REJECTED, failure_reason="no route")
        again = await claim(store, route=None, status=REJECTED, failure_reason="no route")
        assert not again.owned and again.record.id == rejected.record.id
        (record,) = await store.list_all()
        assert record.status == REJECTED and record.failure_reason == "no route"

    run(database_url, scenario)


def test_same_call_id_on_two_carriers_is_two_calls(database_url):
    async def scenario(store):
        a = await claim(store, carrier="twilio")
        b = await claim(store, carrier="plivo")
        assert a.owned and b.owned and a.record.id != b.record.id

    run(database_url, scenario)


def test_migrations_run_once_and_are_recorded(database_url, tmp_path):
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{tmp_path / 'fresh.db'}"  # every migration from none (not the migrated copy)

    async def scenario(store):
        assert await store.migrate() == await store.migrate()
        versions = await store.database.transaction(
            lambda connection: connection.exec_driver_sql("SELECT version FROM schema_version").all()
        )
        assert [v[0] for v in versions] == list(range(1, len(MIGRATIONS) + 1))

    run(database_url, scenario)


def test_failure_reason_is_bounded(database_url):
    async def scenario(store):
        record = (await claim(store)).record
        await store.mark_failed(record.id, "x" * 5000)
        stored = await store.get(record.id)
        assert stored.status == FAILED and len(stored.failure_reason) == 500

    run(database_url, scenario)


def test_plain_database_urls_pick_the_drivers():
    assert engine_url("sqlite:///./gateway.db") == "sqlite:///./gateway.db"
    assert engine_url("postgresql://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert engine_url("postgres://u@h/db") == "postgresql+asyncpg://u@h/db"


def test_a_database_from_before_the_media_columns_is_upgraded(tmp_path):
    """Version 1 and 2 as first released (no media columns), then today's migrations."""
    import sqlalchemy as sa

    path = tmp_path / "old.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE calls (id VARCHAR(36) PRIMARY KEY, direction VARCHAR(16) NOT NULL, carrier VARCHAR(16) NOT NULL,"
            " carrier_call_id VARCHAR(255), status VARCHAR(32) NOT NULL, created_at DATETIME NOT NULL)"
        )
        connection.exec_driver_sql("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DATETIME NOT NULL)")
        connection.exec_driver_sql("INSERT INTO schema_version VALUES (1, '2026-11-20 00:00:00'), (2, '2026-11-20 00:00:00')")
        connection.exec_driver_sql(
            "CREATE TABLE transfers (id VARCHAR(36) PRIMARY KEY, call_id VARCHAR(36) NOT NULL, kind VARCHAR(8) NOT NULL,"
            " active_call_id VARCHAR(36) UNIQUE, created_at DATETIME NOT NULL)"
        )
    engine.dispose()

    async def scenario(store):
        assert await store.migrate() == len(MIGRATIONS)
        columns = await store.database.transaction(
            lambda connection: {c["name"] for c in sa.inspect(connection).get_columns("calls")}
        )
        assert {"media_stats", "recording_path", "media_token", "placed_at"} <= columns
        indexes = await store.database.transaction(
            lambda connection: {i["name"] for i in sa.inspect(connection).get_indexes("calls")}
        )
        assert "ix_calls_status_created" in indexes
        indexes = await store.database.transaction(
            lambda connection: {i["name"] for i in sa.inspect(connection).get_indexes("transfers")}
        )
        assert "ix_transfers_live" in indexes

    run(f"sqlite:///{path}", scenario)


def test_calls_a_dead_process_left_half_made_are_failed_once(database_url):
    import sqlalchemy as sa

    from gateway.store.calls import utcnow
    from gateway.store.schema import calls

    async def scenario(store):
        old, fresh = await claim(store, "CA-old"), await claim(store, "CA-fresh")
        answered = await claim(store, "CA-answered")
        await store.mark_connected(answered.record.id, ultravox_call_id="uv-1", join_url="wss://x/1")
        long_ago = utcnow() - dt.timedelta(minutes=5)
        await store.database.transaction(lambda connection: connection.execute(
            sa.update(calls).where(calls.c.id.in_([old.record.id, answered.record.id])).values(updated_at=long_ago)))
        before = utcnow() - dt.timedelta(minutes=1)
        (failed,) = await store.fail_abandoned("creating", before=before, reason="the gateway stopped")
        assert failed.id == old.record.id
        assert (await store.get(old.record.id)).status == FAILED
        assert (await store.get(old.record.id)).failure_reason == "the gateway stopped"
        assert (await store.get(fresh.record.id)).status == CREATING  # its process may still be working
        assert (await store.get(answered.record.id)).status == IN_PROGRESS
        assert await store.fail_abandoned("creating", before=before, reason="again") == []
        # A carrier retry now gets a fresh attempt, as after any failure.
        assert (await claim(store, "CA-old")).owned

    run(database_url, scenario)


def test_recordings_are_listed_as_they_start_and_forgotten_one_by_one_also_when_racing(database_url):
    async def scenario(store):
        call_id = (await claim(store)).record.id
        names = [f"{call_id}-{n}.wav" for n in range(12)]
        # Replicas listing and forgetting at once must not undo each other.
        await asyncio.gather(*(store.add_recording(call_id, f"/recordings/{name}") for name in names))
        assert sorted((await store.get(call_id)).recordings) == sorted(f"/recordings/{name}" for name in names)
        await store.record_media(call_id, {"frames_in": 1})  # the end of a stretch keeps the list
        await asyncio.gather(*(store.forget_recording(call_id, name) for name in names[:6] + names[:3]))
        assert sorted((await store.get(call_id)).recordings) == sorted(f"/recordings/{name}" for name in names[6:])
        for name in names[6:]:
            await store.forget_recording(call_id, name)
        record = await store.get(call_id)
        assert record.recording_path is None and record.media == {"frames_in": 1}
        await store.forget_recording("no-such-call", names[0])  # nothing to do

    run(database_url, scenario)


def test_live_calls_are_counted_by_carrier_and_route_from_an_index(database_url):
    async def scenario(store):
        live = await claim(store, call_id="CA1")
        await store.mark_connected(live.record.id, ultravox_call_id="uv-1", join_url="wss://x/1")
        await claim(store, call_id="CA2", route="bridged")
        ended = await claim(store, call_id="CA3")
        await store.mark_failed(ended.record.id, "apology")
        await claim(store, call_id="PL1", carrier="plivo")
        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
        assert sorted(await store.live_calls(since)) == [("plivo", "support", 1), ("twilio", "bridged", 1),
                                                         ("twilio", "support", 1)]
        # A call created before the horizon was never told it ended: not counted.
        assert await store.live_calls(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)) == []
        if store.database.dialect == "sqlite":  # PostgreSQL plans by table size: nothing to learn from 4 rows
            plan = await store.database.transaction(query_plan, live_calls_query(since))
            assert "USING INDEX ix_calls_status_created" in str(plan), plan

    run(database_url, scenario)


def query_plan(connection, query):
    compiled = query.compile(connection, compile_kwargs={"literal_binds": True})
    return connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").all()


def test_transfers_under_way_are_counted_by_kind_from_an_index(database_url):
    async def scenario(store):
        transfers = TransferStore(store.database)
        calls = [(await claim(store, call_id=f"CA{n}")).record.id for n in range(3)]
        started = [await transfers.start(call_id=call_id, kind=kind, operator="sales", reason="quote", summary=None,
                                         prior_ultravox_call_id=None) for call_id, kind in zip(calls, ["cold", "warm", "warm"])]
        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
        assert sorted(await transfers.live_transfers(since)) == [("cold", 1), ("warm", 2)]
        await transfers.finish(started[1].id, TRANSFER_FAILED, "no answer")
        assert sorted(await transfers.live_transfers(since)) == [("cold", 1), ("warm", 1)]
        if store.database.dialect == "sqlite":
            plan = await store.database.transaction(query_plan, live_transfers_query(since))
            assert "USING INDEX ix_transfers_live" in str(plan), plan

    run(database_url, scenario)


def test_a_database_of_version_7_gets_the_events_tables_and_the_jobs_rerun_column(database_url):
    import sqlalchemy as sa

    async def scenario(store):
        def back_to_7(connection):
            for table in ("delivery_attempts", "deliveries", "events", "webhook_endpoints"):
                connection.exec_driver_sql(f"DROP TABLE {table}")
            connection.exec_driver_sql("ALTER TABLE jobs DROP COLUMN rerun")
            connection.exec_driver_sql("DELETE FROM schema_version WHERE version >= 8")  # and those after

        await store.database.transaction(back_to_7)
        assert await store.migrate() == len(MIGRATIONS)
        tables, columns = await store.database.transaction(lambda connection: (
            set(sa.inspect(connection).get_table_names()),
            {c["name"] for c in sa.inspect(connection).get_columns("jobs")}))
        assert {"events", "deliveries", "delivery_attempts", "webhook_endpoints"} <= tables and "rerun" in columns

    run(database_url, scenario)


def test_a_database_of_version_9_gets_deliveries_claimed_directly_and_keeps_what_was_pending(database_url):
    import sqlalchemy as sa

    from gateway.store.events import EventStore, NewEvent, insert_events

    async def scenario(store):
        await store.database.transaction(insert_events, [NewEvent("call.started", {}, ("crm",), call_id="c1")])

        def back_to_9(connection):
            connection.exec_driver_sql("DROP INDEX ix_deliveries_due")
            for column in ("due_at", "lease_owner", "lease_until"):
                connection.exec_driver_sql(f"ALTER TABLE deliveries DROP COLUMN {column}")
            connection.exec_driver_sql("DELETE FROM schema_version WHERE version >= 10")

        await store.database.transaction(back_to_9)
        assert await store.migrate() == len(MIGRATIONS)
        indexes = await store.database.transaction(
            lambda connection: {index["name"] for index in sa.inspect(connection).get_indexes("deliveries")})
        assert "ix_deliveries_due" in indexes
        # The delivery pending from before is due: the next dispatcher sends it.
        (pending,) = await EventStore(store.database).claim("crm", "p1", lease=dt.timedelta(seconds=30), limit=10)
        assert pending.event_type == "call.started"

    run(database_url, scenario)


def test_a_database_of_version_13_loses_the_unused_delivery_status_index(database_url):
    import sqlalchemy as sa

    async def scenario(store):
        def indexes(connection):
            return {index["name"] for index in sa.inspect(connection).get_indexes("deliveries")}

        def back_to_13(connection):
            connection.exec_driver_sql("CREATE INDEX ix_deliveries_status ON deliveries (status, event_seq)")
            connection.exec_driver_sql("DELETE FROM schema_version WHERE version >= 14")

        await store.database.transaction(back_to_13)
        assert "ix_deliveries_status" in await store.database.transaction(indexes)
        assert await store.migrate() == len(MIGRATIONS)
        assert "ix_deliveries_status" not in await store.database.transaction(indexes)
        assert "ix_deliveries_due" in await store.database.transaction(indexes)

    run(database_url, scenario)


def test_only_the_head_of_a_stream_is_due_and_the_next_is_due_once_it_is_settled(database_url):
    from gateway.flows.events import Outcome
    from gateway.store.events import DELIVERED, Attempt, EventStore, NewEvent, insert_events

    async def scenario(store):
        events = EventStore(store.database)
        first = NewEvent("call.started", {}, ("crm",), call_id="c1")
        second = NewEvent("call.status_changed", {}, ("crm",), call_id="c1")
        other = NewEvent("call.started", {}, ("crm",), call_id="c2")
        await store.database.transaction(insert_events, [first, second, other])  # one transaction, two streams
        later = NewEvent("call.ended", {}, ("crm",), call_id="c2")
        await store.database.transaction(insert_events, [later])  # behind c2's pending head
        claim = lambda: events.claim("crm", "p1", lease=dt.timedelta(seconds=30), limit=10)  # noqa: E731
        heads = await claim()
        assert sorted(p.event_id for p in heads) == sorted([first.id, other.id])
        assert await claim() == []  # the rest wait for their heads
        now = dt.datetime.now(dt.timezone.utc)
        # Recorded, and what that made due claimed, in one transaction (a dispatcher's turn).
        freed = await events.attempted_and_claim("p1", [Outcome(p, Attempt(now, 204, None, 1), DELIVERED) for p in heads],
                                                 "crm", lease=dt.timedelta(seconds=30), limit=10)
        assert sorted(p.event_id for p in freed) == sorted([second.id, later.id])

    run(database_url, scenario)


def test_an_event_whose_key_exists_is_left_out_with_its_deliveries(database_url):
    from gateway.store.events import EventFilters, EventStore, NewEvent, insert_events

    async def scenario(store):
        events = EventStore(store.database)
        ended = lambda: NewEvent("call.ended", {}, ("crm", "bi"), call_id="c1", key="call.ended:c1")  # noqa: E731
        started = NewEvent("call.started", {}, ("crm",), call_id="c2")
        assert await store.database.transaction(insert_events, [ended()]) == {("crm", "c1"), ("bi", "c1")}
        # Once per key, however often it is written; the other events of the same write go in.
        assert await store.database.transaction(insert_events, [ended(), started]) == {("crm", "c2")}
        listed, _ = await events.list(EventFilters(), limit=10, before_seq=None)
        assert sorted((e.type, len(e.deliveries)) for e in listed) == [("call.ended", 2), ("call.started", 1)]

    run(database_url, scenario)


def test_on_sqlite_a_thread_of_its_own_checkpoints_the_wal_into_the_database_file(tmp_path):
    import sqlalchemy as sa

    from gateway.store.database import BACKSTOP_CHECKPOINT_PAGES, CHECKPOINT_SECONDS, Database

    async def scenario():
        database = Database.open(f"sqlite:///{tmp_path / 'wal.db'}")

        def write(connection):
            connection.exec_driver_sql("CREATE TABLE filler (data TEXT)")
            for _ in range(400):  # about 1.6 MB, far below the writer's own checkpoint
                connection.exec_driver_sql("INSERT INTO filler VALUES (?)", (os.urandom(2000).hex(),))

        await database.transaction(write)
        assert (tmp_path / "wal.db").stat().st_size < 100_000  # all of it in the WAL so far
        await asyncio.sleep(CHECKPOINT_SECONDS * 2.5)
        assert (tmp_path / "wal.db").stat().st_size > 1_000_000  # copied into the file, not by the writer
        assert BACKSTOP_CHECKPOINT_PAGES * 4096 > 10 * 1_600_000
        assert await database.transaction(lambda c: c.execute(sa.text("SELECT count(*) FROM filler")).scalar()) == 400
        await database.close()

    asyncio.run(scenario())


def test_on_sqlite_an_urgent_transaction_goes_ahead_of_queued_ones(tmp_path):
    import threading

    from gateway.store.database import Database

    async def scenario():
        database = Database.open(f"sqlite:///{tmp_path / 'order.db'}")
        ran: list[str] = []
        running = threading.Event()
        release = threading.Event()

        def hold(connection):
            running.set()
            release.wait(5)
            ran.append("running")

        first = asyncio.ensure_future(database.transaction(hold))
        await asyncio.get_running_loop().run_in_executor(None, running.wait, 5)
        queued = [asyncio.ensure_future(database.transaction(lambda c, name=name: ran.append(name)))
                  for name in ("background-1", "background-2")]
        urgent = asyncio.ensure_future(database.transaction(lambda c: ran.append("urgent"), urgent=True))
        await asyncio.sleep(0.05)  # all three queued behind the one running
        release.set()
        await asyncio.gather(first, *queued, urgent)
        await database.close()
        assert ran == ["running", "urgent", "background-1", "background-2"]

    asyncio.run(scenario())


def test_on_sqlite_the_store_thread_outlives_a_loop_closed_while_it_worked(tmp_path):
    import threading

    from gateway.store.database import Database

    database = Database.open(f"sqlite:///{tmp_path / 'loops.db'}")
    release = threading.Event()

    async def leave_one_running():
        asyncio.ensure_future(database.transaction(lambda connection: release.wait(5)))
        await asyncio.sleep(0.05)

    asyncio.run(leave_one_running())  # the loop closes while its transaction runs
    release.set()

    async def next_loop():
        one = await asyncio.wait_for(database.transaction(lambda c: c.exec_driver_sql("SELECT 1").scalar()), 5)
        await database.close()
        return one

    assert asyncio.run(next_loop()) == 1


def test_the_observer_sees_an_outcome_as_the_store_then_holds_it(database_url):
    class Watching:
        def __init__(self):
            self.seen = []

        def call_changed(self, before, after):
            self.seen.append((before, after))
            return []

        def transfer_changed(self, before, after, route):
            return []

        def write(self, connection, effects):
            pass

        def committed(self):
            pass

    async def scenario(store):
        watching = store.observer = Watching()
        connected = (await claim(store, "CA1")).record
        failed = (await claim(store, "CA2")).record
        await store.mark_connected(connected.id, ultravox_call_id="uv-1", join_url="wss://join/1", stream_expires=99)
        await store.mark_failed(failed.id, "Ultravox answered 500")
        # The same rank again changes nothing, and is not observed.
        await store.mark_connected(connected.id, ultravox_call_id="uv-2", join_url="wss://join/2")
        observed = {after.id: (before, after) for before, after in watching.seen if before is not None}
        assert set(observed) == {connected.id, failed.id}
        for call_id, (before, after) in observed.items():
            assert before.status == CREATING
            assert after == await store.get(call_id)  # every field, as a fresh read gives it
        assert observed[connected.id][1].status == IN_PROGRESS and observed[connected.id][1].lease_until is None

    run(database_url, scenario)
