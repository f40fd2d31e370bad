"""`ServerThread`: run an ASGI app with uvicorn in a background thread, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import uvicorn

__all__ = ["ServerThread"]


class _ThreadServer(uvicorn.Server):
    _loop: asyncio.AbstractEventLoop | None = None
    _wake: asyncio.Event | None = None

    # Signal handlers belong to the main thread and the test runner; this
    # server is stopped through should_exit only.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        # uvicorn's loop looks at should_exit every 100 ms; `wake` makes it look at once
        # (a test suite starts and stops hundreds of servers).
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's own shutdown sleeps a fixed 100 ms after asking the connections to close, then
        # polls them every 100 ms; a suite stops hundreds of servers, so this one polls every 5 ms.
        # Otherwise the same steps: stop accepting, close connections, wait (bounded), lifespan.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
                    await asyncio.sleep(0.005)
        except TimeoutError:
            for task in self.server_state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()

    def wake(self) -> None:
        """Make the serving loop check should_exit now (from any thread)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(wake.set)


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread on its own event loop.

    The listening socket is bound here, before the thread starts, so the port
    is known and reserved up front (no pick-a-port-then-bind race).
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        graceful_timeout: float = 1.0,
        start_timeout: float = 10.0,
    ) -> None:
        self.app = app
        self.host = host
        self._requested_port = port
        self._start_timeout = start_timeout
        self.config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            loop="asyncio",
            # A request that never finishes (a scripted hang) must not block stop().
            timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]
        )
        self.server = _ThreadServer(self.config)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.port: int = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerThread":
        if self._thread is not None or self.server.started:
            raise RuntimeError("a ServerThread can be started only once")
        # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets whose protocol
        # says TCP, and accepted connections inherit it. With proto 0, Nagle's algorithm held a
        # small message behind a large one for a 40 ms delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._run, name=f"ServerThread:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                self.stop()
                raise RuntimeError(
                    f"server failed to start (lifespan startup error?): {self._error!r}"
                ) from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("server did not start in time")
            time.sleep(0.005)
        return self

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])  # type: ignore[list-item]
        except BaseException as exc:  # SystemExit on lifespan startup failure
            self._error = exc

    def stop(self, timeout: float = 10.0) -> None:
        thread = self._thread
        if thread is None:
            return
        self.server.should_exit = True
        self.server.wake()
        thread.join(timeout)
        if thread.is_alive():
            # Skip waiting for connections and let asyncio.run cancel the rest.
            self.server.force_exit = True
            thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._thread = None

    def __enter__(self) -> "ServerThread":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
