"""Event deliveries from a process of their own, beside the server process ([events] delivery_process).

Sending an event and recording what came of it cost CPU and store transactions. In the server
process they compete with answering calls for its event loop, its GIL and, on SQLite, its store
thread; bench/inbound.py measured what that does to the inbound webhooks (bench/README.md: on
SQLite mostly to the slowest of them, p99). So each server process starts a delivery process,
which runs the same `EventDelivery`: its dispatchers claim the deliveries from the store, so
either process may die at any moment and nothing is lost (a dead process's claims run out, and
they are claimed again).

The two talk through two pipes: the server writes a byte when it committed new events (look
now, instead of at the next poll), and the delivery process sends back what its attempts came
to, which the server counts in its own /metrics. The server restarts a delivery process that
died, stops it after its own drain (it sends what is under way, records it and exits), and a
server killed outright takes it along (PR_SET_PDEATHSIG: it then stops the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from .settings import Settings

log = logging.getLogger("gateway.deliveries")

# A delivery process records and claims in bigger batches than the server would: its waits cost
# no caller anything, and every transaction it saves is one less holding the store's write lock.
GATHER_SECONDS = 0.1
REPORT_SECONDS = 1.0  # how often the delivery process sends its figures to the server
WATCH_SECONDS = 1.0  # how often the server looks whether its delivery process is alive
STOP_MARGIN_SECONDS = 5.0  # past the send timeout, how long a stop waits before SIGKILL
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
NICENESS = 10


@dataclass
class DeliveryReport:
    """What a delivery process's attempts came to since its last report (see gateway.metrics)."""

    counted: Counter = field(default_factory=Counter)  # (endpoint, result) -> attempts
    lags: list[tuple[str, float]] = field(default_factory=list)  # (endpoint, seconds), one per delivery

    def __bool__(self) -> bool:
        return bool(self.counted or self.lags)

    # The DeliveryMetrics of flows.events, so EventDelivery counts into a report as into /metrics.
    def delivery_counted(self, endpoint: str, result: str, count: int = 1) -> None:
        self.counted[(endpoint, result)] += count

    def delivery_lag_seen(self, endpoint: str, seconds: float) -> None:
        self.lags.append((endpoint, seconds))

    def count_into(self, metrics) -> None:
        for (endpoint, result), attempts in self.counted.items():
            metrics.delivery_counted(endpoint, result, attempts)
        for endpoint, seconds in self.lags:
            metrics.delivery_lag_seen(endpoint, seconds)


class DeliveryProcess:
    """The server's side: starts, watches and stops its delivery process, wakes it, and counts its
    reports into `metrics`. The same start/wake/stop as EventDelivery, for the Gateway.

    Each delivery process gets pipes of its own, and the server keeps only its own ends of them:
    when the process dies, its reports pipe ends (EOF), so a report it was writing as it died
    cannot leave the server waiting for the rest."""

    def __init__(self, settings: Settings, metrics=None):
        self.settings = settings
        self.metrics = metrics
        self._context = multiprocessing.get_context("spawn")  # a fresh interpreter: no loop, no threads copied
        self._process: multiprocessing.process.BaseProcess | None = None
        self._wake_out: Connection | None = None  # the server's ends of the running process's pipes
        self._reports_in: Connection | None = None
        self._watch: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        self._spawn()
        self._watch = asyncio.get_running_loop().create_task(self._keep_running(), name="delivery-process")

    def wake(self) -> None:
        """New events were committed: the delivery process looks at once (one byte; a full pipe
        means it has not read the last ones yet, which say the same)."""
        if self._wake_out is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_out.fileno(), b"\0")

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        process = self._process
        if process is not None and process.is_alive():
            process.terminate()  # SIGTERM: it sends what is under way, records it, and exits
            wait = self.settings.events.timeout_seconds + STOP_MARGIN_SECONDS
            await asyncio.get_running_loop().run_in_executor(None, process.join, wait)
            if process.is_alive():
                log.warning("delivery process %d did not stop within %.0f s; killed (its claims run out "
                            "and are sent again)", process.pid, wait)
                process.kill()
                await asyncio.get_running_loop().run_in_executor(None, process.join)
        self._let_go()

    def _spawn(self) -> None:
        from . import logs

        self._let_go()  # the pipes of the process before, if any
        wake_in, wake_out = self._context.Pipe(duplex=False)
        reports_in, reports_out = self._context.Pipe(duplex=False)
        # Its log lines like the server's: the format and level the server was started with.
        level = logging.getLevelName(logging.getLogger("gateway").getEffectiveLevel())
        process = self._process = self._context.Process(
            # The settings as data: their class is made at run time (one section per carrier), which
            # pickle cannot name; the child validates them again into its own.
            target=run, args=(self.settings.model_dump(), logs.current_format(), level, wake_in, reports_out),
            name="gateway-deliveries", daemon=False)
        process.start()
        wake_in.close()  # the child's ends, which it has its own copies of now
        reports_out.close()
        os.set_blocking(wake_out.fileno(), False)
        self._wake_out, self._reports_in = wake_out, reports_in
        asyncio.get_running_loop().add_reader(reports_in.fileno(), self._read_reports, reports_in)
        log.info("delivery process %d started", process.pid)

    def _let_go(self) -> None:
        """Count what the process's pipe still holds, and close the server's ends of its pipes."""
        if self._reports_in is not None:
            self._read_reports(self._reports_in)
            if not self._reports_in.closed:
                asyncio.get_running_loop().remove_reader(self._reports_in.fileno())
                self._reports_in.close()
        if self._wake_out is not None:
            self._wake_out.close()
        self._wake_out = self._reports_in = None

    async def _keep_running(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_SECONDS)
            process = self._process
            if process is not None and not process.is_alive() and not self._stopping:
                log.warning("delivery process %d exited (%s); starting another", process.pid, process.exitcode)
                self._spawn()

    def _read_reports(self, reports: Connection) -> None:
        if reports.closed:
            return
        try:
            while reports.poll():
                report: DeliveryReport = reports.recv()
                if self.metrics is not None:
                    report.count_into(self.metrics)
        except (EOFError, OSError):  # its process is gone (a report cut short with it is dropped)
            asyncio.get_running_loop().remove_reader(reports.fileno())
            reports.close()


# --- the delivery process ---------------------------------------------------------------------------
def run(settings_data: dict, log_format: str, log_level: str, wake: Connection, reports: Connection) -> None:
    """The delivery process's main: EventDelivery until SIGTERM, or until its server is gone."""
    _end_with_parent()
    from .settings import settings_class

    settings = settings_class().model_validate(settings_data)
    # Ctrl-C in a terminal reaches the whole process group: the server drains on it, and stops
    # this process when done, so it is not for this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Callers first: where the CPU is short, the server process gets it before this one (which
    # catches up when there is some to spare); an idle machine runs both as fast.
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    from . import logs

    logs.configure("json" if log_format == "json" else "text", log_level, settings.secrets())
    asyncio.run(_deliver(settings, wake, reports))


def _end_with_parent() -> None:
    # A server killed with SIGKILL runs no code: let Linux send this process SIGTERM then (and
    # should the server die before this line, the wake pipe's end tells: see _deliver). Named so
    # in ps and top, instead of as the spawn command line's python.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        libc.prctl(PR_SET_NAME, b"gateway-deliver")


async def _deliver(settings: Settings, wake: Connection, reports: Connection) -> None:
    from .flows.events import EventDelivery
    from .flows.sending import HttpSender
    from .store.database import Database
    from .store.events import EventStore

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    database = Database.open(settings.database_url)
    delivery = EventDelivery(settings, EventStore(database), HttpSender(settings.webhooks, settings.events.timeout_seconds),
                             metrics=DeliveryReport(), gather_seconds=GATHER_SECONDS)

    def woken() -> None:
        try:
            if not os.read(wake.fileno(), 4096):  # the server is gone (its end closed)
                loop.remove_reader(wake.fileno())
                stop.set()
                return
        except BlockingIOError:
            return
        delivery.wake()

    os.set_blocking(wake.fileno(), False)
    loop.add_reader(wake.fileno(), woken)
    await delivery.start()
    log.info("delivering events to %s", ", ".join(webhook.name for webhook in settings.webhooks))
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REPORT_SECONDS)
            _send(reports, delivery)
    finally:
        await delivery.stop()
        _send(reports, delivery)
        await database.close()


def _send(reports: Connection, delivery) -> None:
    """What the attempts came to since the last report, to the server; the next report starts."""
    report, delivery.metrics = delivery.metrics, DeliveryReport()
    if report:
        with contextlib.suppress(OSError):  # the server is gone: nobody to count them
            reports.send(report)
