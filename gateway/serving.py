"""Serving: uvicorn, with a SIGTERM that drains instead of cutting calls, on one or several processes.

uvicorn's own SIGTERM handling closes every open WebSocket with 1012 ("service restart") before
any graceful step, which would cut every bridged call. `GatewayServer` takes the first SIGTERM
(or Ctrl-C) as the start of a drain (gateway/drain.py) and stops the server only when the drain is
done; a second signal stops it at once. A drained process exits 0.

`--workers N` runs N such servers as processes sharing one listening socket. uvicorn's own
supervisor builds its workers' servers itself (a plain uvicorn.Server), so it cannot run this
one: `Workers` is the small supervisor that does (start, restart a worker that dies, pass
SIGTERM to each and wait while they drain). The workers share state only through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from typing import Any

import uvicorn

from .read_timeouts import timed_protocol

log = logging.getLogger("gateway.serving")

# After a drain, requests still open (a carrier webhook, say) get this long before they are cut.
GRACEFUL_SECONDS = 15
STARTUP_FAILURE = 3  # uvicorn's exit code for a server that could not start (bad config, port)


def server_config(app: Any, *, host: str, port: int, log_level: str, log_config: Any = None,
                  header_timeout: float = 10.0, body_timeout: float = 20.0) -> uvicorn.Config:
    """`app`: the ASGI app, or (for several workers) the import string of a factory of it;
    `header_timeout`, `body_timeout`: see gateway/read_timeouts.py."""
    options: dict[str, Any] = {}
    if log_config is not None:
        options["log_config"] = log_config
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, factory=isinstance(app, str), lifespan="on",
        # Carriers sign the public URL (GATEWAY_PUBLIC_URL), so proxy headers are not needed for that.
        proxy_headers=False, timeout_graceful_shutdown=GRACEFUL_SECONDS,
        http=timed_protocol(header_timeout, body_timeout), **options,
    )


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self._drain_requested = False
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._drain_requested:  # the second signal: stop now, as uvicorn does
            super().handle_exit(sig, frame)
            return
        self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="drain")
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        try:
            gateway = _gateway_of(self.config.loaded_app)
            if gateway is not None:
                await gateway.drain()
        except Exception:
            log.exception("draining failed; stopping")
        finally:
            self.should_exit = True


def _gateway_of(app: Any):
    """The Gateway behind the loaded ASGI app (uvicorn may have wrapped it in middleware)."""
    for _ in range(10):
        state = getattr(app, "state", None)
        if state is not None and hasattr(state, "gateway"):
            return state.gateway
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def serve(config: uvicorn.Config, workers: int = 1) -> int:
    """Run until drained. The config's `log_config` is this process's logging (uvicorn applied it
    when the config was made) and each worker's."""
    if workers <= 1:
        GatewayServer(config).run()
        return 0
    return Workers(config, workers).run()


def _serve_worker(config: uvicorn.Config, sock: socket.socket) -> None:
    # Out of the terminal's process group: a Ctrl-C reaches the supervisor only, which passes one
    # SIGTERM on (two signals would stop the worker without draining).
    os.setpgrp()
    config.configure_logging()  # a spawned process starts with none
    GatewayServer(config).run(sockets=[sock])


class Workers:
    """`count` GatewayServer processes on one socket, kept running until a SIGTERM or Ctrl-C."""

    def __init__(self, config: uvicorn.Config, count: int):
        self.config = config
        self.count = count
        self.processes: list = []
        self._stopping = False
        self._context = multiprocessing.get_context("spawn")

    def run(self) -> int:
        sock = self.config.bind_socket()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.processes = [self._start(sock) for _ in range(self.count)]
        log.info("serving with %d worker processes on %s:%d", self.count, self.config.host, self.config.port)
        while not self._stopping:
            time.sleep(0.2)
            for index, process in enumerate(self.processes):
                if process.exitcode is None or self._stopping:
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    log.error("worker %d could not start; stopping", process.pid)
                    self._stopping = True
                    break
                log.warning("worker %d exited (%s); starting another", process.pid, process.exitcode)
                self.processes[index] = self._start(sock)
        self._forward()  # each worker drains on its own, then exits
        for process in self.processes:
            process.join()
        sock.close()
        return 0 if all(process.exitcode == 0 for process in self.processes) else 1

    def _on_signal(self, sig: int, frame: Any) -> None:
        if self._stopping:  # a second signal: a second SIGTERM stops each worker at once
            self._forward()
        self._stopping = True

    def _forward(self) -> None:
        for process in self.processes:
            if process.exitcode is None and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def _start(self, sock: socket.socket):
        process = self._context.Process(target=_serve_worker, args=(self.config, sock), name="gateway-worker")
        process.start()
        return process
