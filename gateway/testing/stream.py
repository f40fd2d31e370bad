"""Play a phone carrier's side of a bidirectional media stream against the gateway.

`CarrierStream` connects to the gateway's ``/media/{carrier}`` WebSocket the way
Twilio (Media Streams), Telnyx (media streaming, L16 RTP mode) or Plivo (audio
streams, L16) would: it sends the carrier's opening messages, the caller's
audio in the carrier's encoding and pacing, DTMF and the stop event, and it
records and acknowledges what the gateway sends back (agent audio, clears,
marks/checkpoints)::

    async with CarrierStream("twilio", url, headers=twilio_stream_headers(token, url)) as call:
        await call.start(call_id="CA123")
        await call.play(pcm_8khz)                  # paced at real time
        await call.wait_for("audio", count=10)
        assert call.format_errors == []
        await call.stop()

What differs between carriers is a `StreamDialect`. Each carrier's module
``gateway.testing.<carrier>`` defines its dialect as ``STREAM_DIALECT``, which
`CarrierStream` imports by the carrier's name: a new carrier needs a new module
and no table edited here.

The wire formats are written from the carriers' documentation
(``research/providers.md``), independently of ``gateway.carriers``, so that the
simulator checks the gateway rather than mirroring it. Tests, the
``gateway simulate`` command and the benchmarks share it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import importlib
import json
import time
import uuid
import warnings
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

with warnings.catch_warnings():  # deprecated in 3.11-3.12; audioop-lts provides it from 3.13
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # noqa: F401  (the carrier dialects use it: from .stream import audioop)

__all__ = ["CarrierStream", "Received", "StreamDialect"]


KINDS = ("audio", "clear", "mark", "other")


@dataclasses.dataclass(frozen=True)
class Received:
    """One message from the gateway: ``kind`` is audio, clear, mark or other."""

    at: float  # time.monotonic() on arrival
    kind: str
    data: dict[str, Any]  # the decoded JSON; {"_invalid": text} or {"_binary": bytes} otherwise


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------
# Carrier dialects: what differs between carriers, and nothing else
# ---------------------------------------------------------------------------


class StreamDialect:
    """A carrier's media-stream wire format, seen from the carrier's side."""

    name = ""
    rate = 8000
    lossless = True  # linear PCM: audio crosses the stream bit-exact (False for a companded codec)
    audio_events: frozenset[str] = frozenset({"media"})
    clear_events: frozenset[str] = frozenset({"clear"})
    mark_events: frozenset[str] = frozenset({"mark"})
    clear_acks_marks = True  # a clear returns the pending marks (Twilio, Telnyx)
    mark_ack_event = "mark"  # the event acknowledging a played mark
    clear_ack_event: str | None = None  # the event acknowledging a clear, if the carrier sends one
    # Whether the carrier connects to a stream URL with a query string (Twilio's takes none: its
    # custom parameters travel in the start message).
    url_takes_query = True
    # Codecs the carrier may stream in instead of the one asked for, by name -> sample rate
    # (Telnyx falls back to the call's own G.711 when it cannot transcode); `CarrierStream(codec=)`.
    fallback_codecs: dict[str, int] = {}

    # -- stream identity --------------------------------------------------------

    def new_stream_id(self) -> str:
        return str(uuid.uuid4())

    def new_account_id(self) -> str:
        return str(uuid.uuid4())

    def new_session_id(self) -> str | None:
        return None

    def prepare(self, s: "CarrierStream", custom: dict[str, str]) -> None:
        """Called by `CarrierStream.start` before `opening`: keep what the stream needs in ``s.state``."""

    # -- caller -> gateway ----------------------------------------------------

    def seq(self, n: int) -> Any:
        return str(n)

    def encode(self, pcm16: bytes) -> bytes:
        raise NotImplementedError

    def encode_for(self, s: "CarrierStream", pcm16: bytes) -> bytes:
        """The caller's audio in the stream's codec (``s.codec``; None: the one asked for)."""
        return self.encode(pcm16)

    def opening(
        self, s: "CarrierStream", custom: dict[str, str], extra: dict[str, Any]
    ) -> list[dict[str, Any]]:
        raise NotImplementedError

    def media(self, s: "CarrierStream", payload: bytes, chunk: int, position_ms: int) -> dict[str, Any]:
        raise NotImplementedError

    def dtmf(self, s: "CarrierStream", digit: str) -> dict[str, Any]:
        raise NotImplementedError

    def stop(self, s: "CarrierStream") -> dict[str, Any]:
        raise NotImplementedError

    def mark_ack(self, s: "CarrierStream", name: str) -> dict[str, Any]:
        raise NotImplementedError

    def clear_ack(self, s: "CarrierStream") -> dict[str, Any] | None:
        return None

    # -- gateway -> caller ----------------------------------------------------

    def kind(self, event: Any) -> str:
        if event in self.audio_events:
            return "audio"
        if event in self.clear_events:
            return "clear"
        if event in self.mark_events:
            return "mark"
        return "other"

    def mark_name(self, message: dict[str, Any]) -> Any:
        mark = message.get("mark")
        return mark.get("name") if isinstance(mark, dict) else None

    def check(self, s: "CarrierStream", message: dict[str, Any]) -> list[str]:
        """Format errors in a clear or mark message from the gateway."""
        return []

    def decode(self, s: "CarrierStream", message: dict[str, Any]) -> tuple[bytes, list[str]]:
        """Agent audio (s16le at ``rate``) of an audio message, and its format errors."""
        raise NotImplementedError

    @staticmethod
    def payload(message: dict[str, Any]) -> tuple[bytes | None, str | None]:
        media = message.get("media")
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            return None, "media.payload missing or not a string"
        try:
            return base64.b64decode(media["payload"], validate=True), None
        except (binascii.Error, ValueError):
            return None, "media.payload is not valid base64"


def carrier_member(carrier: str, member: str, kind: type) -> Any:
    """``member`` of the module ``gateway.testing.<carrier>``, an instance of ``kind``; ValueError if none."""
    if not isinstance(carrier, str) or not carrier.isidentifier():
        raise ValueError(f"unknown carrier {carrier!r}")
    name = f"gateway.testing.{carrier}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        raise ValueError(f"unknown carrier {carrier!r}: there is no module {name}") from None
    found = getattr(module, member, None)
    if not isinstance(found, kind):
        raise ValueError(f"unknown carrier {carrier!r}: {name} defines no {member}")
    return found


def _stream_dialect(carrier: str) -> StreamDialect:
    """The ``STREAM_DIALECT`` of the module ``gateway.testing.<carrier>``; ValueError if none."""
    return carrier_member(carrier, "STREAM_DIALECT", StreamDialect)


# ---------------------------------------------------------------------------
# CarrierStream
# ---------------------------------------------------------------------------


class CarrierStream:
    """A carrier's side of one media stream WebSocket, for tests and benchmarks.

    ``received`` holds every message from the gateway in arrival order; the
    agent audio is decoded into s16le PCM at ``rate`` (`agent_audio`). Marks
    are acknowledged like the carrier does: with ``playback="realtime"`` (the
    default) once the audio queued before them has had time to play, with
    ``"instant"`` at once; a clear drops the queue (and, as the dialect says,
    returns the pending marks or answers the clear instead: ``clear_acks_marks``,
    ``clear_ack_event``). ``acknowledged`` lists the marks acknowledged so far.
    Deviations from the carrier's documented format in what the gateway sends
    are collected in ``format_errors``. The stream names no carrier: all that
    differs is its `StreamDialect` (``dialect``).
    """

    def __init__(
        self,
        carrier: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        parameters: dict[str, str] | None = None,
        codec: str | None = None,
        playback: str = "realtime",
        open_timeout: float = 10.0,
    ) -> None:
        dialect = _stream_dialect(carrier)
        if playback not in ("realtime", "instant"):
            raise ValueError("playback must be 'realtime' or 'instant'")
        if codec is not None and codec not in dialect.fallback_codecs:
            raise ValueError(f"{carrier} streams in no codec {codec!r} (its fallbacks: {sorted(dialect.fallback_codecs)})")
        if not dialect.url_takes_query and urlsplit(url).query:
            raise ValueError(f"{carrier} stream URLs take no query string, got {url!r}: "
                             "give what the socket needs as stream parameters")
        self.carrier = carrier
        self.url = url
        self.headers = dict(headers or {})
        # The stream's parameters as the answer gave them (Twilio's <Parameter>s): `start` sends them.
        self.parameters = dict(parameters or {})
        # A codec the carrier fell back to (None: the one the gateway asked for), both ways.
        self.codec = codec
        self.playback = playback
        self.open_timeout = open_timeout
        self._dialect = dialect
        # Stream identity (set by start()).
        self.call_id: str | None = None
        self.stream_id: str | None = None
        self.account_id: str | None = None
        self.session_id: str | None = None
        self.started_at: float | None = None  # loop time of start()
        # What happened.
        self.received: list[Received] = []
        self.sent: list[dict[str, Any]] = []  # JSON messages sent, in order
        self.format_errors: list[str] = []
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.frames_sent = 0  # media messages sent
        self.acknowledged: list[str] = []  # names of the marks acknowledged as played, in order
        # Internals.
        self._ws: ClientConnection | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._changed: asyncio.Condition | None = None
        self._send_lock: asyncio.Lock | None = None
        self._agent_audio = bytearray()
        self._seq = 0
        self._chunk = 0
        self._samples_sent = 0
        self._next_frame_at = 0.0
        self._play_until = 0.0  # loop time at which the queued agent audio has played
        self._pending_marks: list[tuple[str, asyncio.TimerHandle]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.state: dict[str, Any] = {}  # what the dialect keeps for this stream (see StreamDialect.prepare)

    # -- properties -----------------------------------------------------------

    @property
    def dialect(self) -> StreamDialect:
        """The carrier's wire format this stream speaks."""
        return self._dialect

    @property
    def rate(self) -> int:
        """Sample rate of the caller's and the agent's audio on this stream."""
        return self._dialect.fallback_codecs[self.codec] if self.codec else self._dialect.rate

    @property
    def frame_bytes(self) -> int:
        """Bytes of s16le PCM in 20 ms at ``rate``."""
        return self.rate // 50 * 2

    def agent_audio(self) -> bytes:
        """All agent audio received so far, decoded to s16le PCM at ``rate``."""
        return bytes(self._agent_audio)

    def of_kind(self, kind: str) -> list[Received]:
        return [r for r in self.received if r.kind == kind]

    # -- connection -----------------------------------------------------------

    async def connect(self) -> "CarrierStream":
        if self._ws is not None:
            raise RuntimeError("already connected")
        self._changed = asyncio.Condition()
        self._send_lock = asyncio.Lock()
        self._ws = await connect(
            self.url,
            additional_headers=self.headers or None,
            compression=None,
            open_timeout=self.open_timeout,
            max_size=None,
        )
        self._receiver = asyncio.create_task(self._receive_loop(), name=f"CarrierStream:{self.carrier}")
        return self

    async def close(self, code: int = 1000) -> None:
        """Close the socket (if still open) and stop the receiver."""
        if self._ws is None:
            return
        with contextlib.suppress(Exception):
            await self._ws.close(code)
        if self._receiver is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._receiver, 5.0)
        for task in list(self._tasks):
            task.cancel()

    async def __aenter__(self) -> "CarrierStream":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        """Wait until the gateway has closed the socket; return the close code."""
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    # -- caller -> gateway ----------------------------------------------------

    def _next_seq(self) -> Any:
        self._seq += 1
        return self._dialect.seq(self._seq)

    def _require_ws(self) -> ClientConnection:
        if self._ws is None:
            raise RuntimeError("not connected; call connect() first")
        return self._ws

    async def _send_json(self, message: dict[str, Any]) -> None:
        ws = self._require_ws()
        assert self._send_lock is not None
        async with self._send_lock:
            await ws.send(json.dumps(message, separators=(",", ":")))
            self.sent.append(message)

    async def send_raw(self, data: str | bytes) -> None:
        """Send a text or binary frame as is (for malformed-frame tests)."""
        ws = self._require_ws()
        assert self._send_lock is not None
        async with self._send_lock:
            await ws.send(data)

    async def start(
        self,
        *,
        call_id: str,
        stream_id: str | None = None,
        custom_parameters: dict[str, str] | None = None,
        account_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Send the carrier's opening messages with the stream's ``parameters`` (``custom_parameters``
        win); ``extra`` is merged into the ``start`` object."""
        self._require_ws()
        self.call_id = call_id
        self.stream_id = stream_id or self._dialect.new_stream_id()
        self.account_id = account_id or self._dialect.new_account_id()
        self.session_id = self._dialect.new_session_id()
        custom = {**self.parameters, **(custom_parameters or {})}
        self._dialect.prepare(self, custom)
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        self._next_frame_at = self.started_at
        for message in self._dialect.opening(self, custom, dict(extra or {})):
            await self._send_json(message)

    async def send_audio(self, pcm16: bytes) -> None:
        """Send s16le PCM at ``rate`` as one ``media`` event in the carrier's encoding."""
        if self.started_at is None:
            raise RuntimeError("call start() before sending audio")
        if len(pcm16) % 2:
            raise ValueError("s16le PCM must have an even number of bytes")
        self._chunk += 1
        position_ms = self._samples_sent * 1000 // self.rate
        self._samples_sent += len(pcm16) // 2
        message = self._dialect.media(self, self._dialect.encode_for(self, bytes(pcm16)), self._chunk, position_ms)
        await self._send_json(message)
        self.frames_sent += 1

    async def play(self, pcm16: bytes, *, frame_ms: int = 20, realtime: bool = True) -> int:
        """Send ``pcm16`` as ``frame_ms`` frames (the last one padded with silence).

        With ``realtime`` frame k goes out at t0 + k * frame_ms on an absolute
        schedule (no drift); consecutive calls continue the same schedule. Stops
        quietly if the gateway closes the socket; returns the frames sent.
        """
        size = self.rate * frame_ms // 1000 * 2
        if size <= 0:
            raise ValueError("frame_ms too small")
        loop = asyncio.get_running_loop()
        t0 = max(loop.time(), self._next_frame_at)
        period = frame_ms / 1000
        sent = 0
        for k, offset in enumerate(range(0, len(pcm16), size)):
            frame = pcm16[offset : offset + size]
            if len(frame) < size:
                frame = bytes(frame) + bytes(size - len(frame))
            if realtime:
                delay = t0 + k * period - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            if self.closed.is_set():
                break
            try:
                await self.send_audio(frame)
            except ConnectionClosed:
                break
            sent += 1
        if realtime:
            self._next_frame_at = t0 + sent * period
        return sent

    async def play_silence(self, seconds: float, *, frame_ms: int = 20, realtime: bool = True) -> int:
        return await self.play(bytes(int(self.rate * seconds) * 2), frame_ms=frame_ms, realtime=realtime)

    async def send_dtmf(self, digit: str) -> None:
        await self._send_json(self._dialect.dtmf(self, digit))

    async def stop(self) -> None:
        """Send the carrier's stop event (the socket stays open; see `close`)."""
        await self._send_json(self._dialect.stop(self))

    # -- gateway -> caller ----------------------------------------------------

    async def wait_for(self, kind: str, *, count: int = 1, timeout: float = 5.0) -> list[Received]:
        """Wait until ``count`` messages of ``kind`` have arrived; return all of that kind.

        Raises TimeoutError on timeout, or as soon as the socket closes short of ``count``.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        assert self._changed is not None, "not connected"

        def done() -> bool:
            return len(self.of_kind(kind)) >= count or self.closed.is_set()

        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(done)
        except TimeoutError:
            pass
        found = self.of_kind(kind)
        if len(found) < count:
            why = f"socket closed ({self.close_code})" if self.closed.is_set() else f"{timeout} s passed"
            raise TimeoutError(f"{len(found)} of {count} {kind!r} messages from the gateway; {why}")
        return found

    async def _receive_loop(self) -> None:
        ws = self._ws
        assert ws is not None and self._changed is not None
        try:
            async for frame in ws:
                self._on_frame(frame)
                async with self._changed:
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = ws.close_code
            self.close_reason = ws.close_reason
            for _, handle in self._pending_marks:
                handle.cancel()
            self._pending_marks.clear()
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    def _on_frame(self, frame: str | bytes) -> None:
        now = time.monotonic()
        if isinstance(frame, bytes):
            self.format_errors.append(f"binary frame of {len(frame)} bytes (carriers expect JSON text)")
            self.received.append(Received(now, "other", {"_binary": frame}))
            return
        try:
            message = json.loads(frame)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.format_errors.append(f"text frame is not a JSON object: {frame[:80]!r}")
            self.received.append(Received(now, "other", {"_invalid": frame}))
            return
        kind = self._dialect.kind(message.get("event"))
        if kind == "audio":
            pcm, errors = self._dialect.decode(self, message)
            self.format_errors.extend(errors)
            self._agent_audio.extend(pcm)
            loop = asyncio.get_running_loop()
            self._play_until = max(loop.time(), self._play_until) + len(pcm) / (2 * self.rate)
        elif kind in ("clear", "mark"):
            self.format_errors.extend(self._dialect.check(self, message))
        self.received.append(Received(now, kind, message))
        if kind == "mark":
            self._on_mark(message)
        elif kind == "clear":
            self._on_clear()

    def _spawn_send(self, message: dict[str, Any]) -> None:
        async def send() -> None:
            with contextlib.suppress(ConnectionClosed, RuntimeError):
                await self._send_json(message)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_mark(self, message: dict[str, Any]) -> None:
        name = self._dialect.mark_name(message)
        if not isinstance(name, str):
            return
        loop = asyncio.get_running_loop()
        due = max(loop.time(), self._play_until) if self.playback == "realtime" else loop.time()

        def played() -> None:
            self._pending_marks.remove(pending)
            self.acknowledged.append(name)
            self._spawn_send(self._dialect.mark_ack(self, name))

        handle = loop.call_at(due, played)
        pending = (name, handle)
        self._pending_marks.append(pending)

    def _on_clear(self) -> None:
        loop = asyncio.get_running_loop()
        self._play_until = loop.time()
        pending, self._pending_marks = self._pending_marks, []
        for name, handle in pending:
            handle.cancel()
            if self._dialect.clear_acks_marks:
                self.acknowledged.append(name)
                self._spawn_send(self._dialect.mark_ack(self, name))
        ack = self._dialect.clear_ack(self)
        if ack is not None:
            self._spawn_send(ack)
