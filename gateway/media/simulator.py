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

The wire formats are written here from the carriers' documentation
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
import json
import secrets
import string
import time
import uuid
import warnings
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

with warnings.catch_warnings():  # deprecated in 3.11-3.12; audioop-lts provides it from 3.13
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["CARRIERS", "CarrierStream", "Received", "twilio_stream_headers"]

CARRIERS = ("twilio", "telnyx", "plivo")
KINDS = ("audio", "clear", "mark", "other")


def twilio_stream_headers(auth_token: str, url: str) -> dict[str, str]:
    """The ``X-Twilio-Signature`` header Twilio sends when it opens a media stream.

    Twilio signs the stream URL exactly as written in the TwiML (``wss://``,
    with its query string) with no POST parameters.
    """
    from twilio.request_validator import RequestValidator

    return {"X-Twilio-Signature": RequestValidator(auth_token).compute_signature(url, {})}


@dataclasses.dataclass(frozen=True)
class Received:
    """One message from the gateway: ``kind`` is audio, clear, mark or other."""

    at: float  # time.monotonic() on arrival
    kind: str
    data: dict[str, Any]  # the decoded JSON; {"_invalid": text} or {"_binary": bytes} otherwise


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _swap16(pcm: bytes) -> bytes:
    """Swap the bytes of each 16-bit sample (s16le <-> s16be)."""
    return np.frombuffer(pcm, dtype="<i2").astype(">i2").tobytes()


# ---------------------------------------------------------------------------
# Carrier dialects: what differs between carriers, and nothing else
# ---------------------------------------------------------------------------


class _Dialect:
    """A carrier's media-stream wire format, seen from the carrier's side."""

    name = ""
    rate = 8000
    audio_events: frozenset[str] = frozenset({"media"})
    clear_events: frozenset[str] = frozenset({"clear"})
    mark_events: frozenset[str] = frozenset({"mark"})
    clear_acks_marks = True  # a clear returns the pending marks (Twilio, Telnyx)

    # -- caller -> gateway ----------------------------------------------------

    def seq(self, n: int) -> Any:
        return str(n)

    def encode(self, pcm16: bytes) -> bytes:
        raise NotImplementedError

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


class _Twilio(_Dialect):
    name = "twilio"
    rate = 8000

    def encode(self, pcm16: bytes) -> bytes:
        return audioop.lin2ulaw(pcm16, 2)

    def opening(self, s, custom, extra):
        start = {
            "accountSid": s.account_id,
            "streamSid": s.stream_id,
            "callSid": s.call_id,
            "tracks": ["inbound"],
            "customParameters": dict(custom),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            **extra,
        }
        return [
            {"event": "connected", "protocol": "Call", "version": "1.0.0"},
            {"event": "start", "sequenceNumber": s._next_seq(), "start": start, "streamSid": s.stream_id},
        ]

    def media(self, s, payload, chunk, position_ms):
        return {
            "event": "media",
            "sequenceNumber": s._next_seq(),
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(position_ms),
                "payload": _b64(payload),
            },
            "streamSid": s.stream_id,
        }

    def dtmf(self, s, digit):
        return {
            "event": "dtmf",
            "streamSid": s.stream_id,
            "sequenceNumber": s._next_seq(),
            "dtmf": {"track": "inbound_track", "digit": digit},
        }

    def stop(self, s):
        return {
            "event": "stop",
            "sequenceNumber": s._next_seq(),
            "stop": {"accountSid": s.account_id, "callSid": s.call_id},
            "streamSid": s.stream_id,
        }

    def mark_ack(self, s, name):
        return {
            "event": "mark",
            "sequenceNumber": s._next_seq(),
            "streamSid": s.stream_id,
            "mark": {"name": name},
        }

    def _stream_errors(self, s, message):
        if message.get("streamSid") != s.stream_id:
            return [f"{message.get('event')}: streamSid {message.get('streamSid')!r} is not {s.stream_id!r}"]
        return []

    def check(self, s, message):
        errors = self._stream_errors(s, message)
        if message.get("event") == "mark" and not isinstance(self.mark_name(message), str):
            errors.append("mark: mark.name missing")
        return errors

    def decode(self, s, message):
        errors = self._stream_errors(s, message)
        raw, error = self.payload(message)
        if raw is None:
            return b"", errors + [f"media: {error}"]
        return audioop.ulaw2lin(raw, 2), errors


class _Telnyx(_Dialect):
    name = "telnyx"
    rate = 16000
    min_chunk_ms = 20  # "RTP media chunks sent back to Telnyx can contain 20 milliseconds to 30 seconds"

    def encode(self, pcm16: bytes) -> bytes:
        return _swap16(pcm16)  # L16 is network byte order

    def opening(self, s, custom, extra):
        start = {
            "user_id": s.account_id,
            "call_control_id": s.call_id,
            "call_session_id": s.session_id,
            "from": "+15551230001",
            "to": "+15550001111",
            "tags": [],
            "client_state": "",
            "media_format": {"encoding": "L16", "sample_rate": 16000, "channels": 1},
        }
        if custom:
            start["custom_parameters"] = dict(custom)
        start.update(extra)
        return [
            {"event": "connected", "version": "1.0.0"},
            {"event": "start", "sequence_number": s._next_seq(), "start": start, "stream_id": s.stream_id},
        ]

    def media(self, s, payload, chunk, position_ms):
        return {
            "event": "media",
            "sequence_number": s._next_seq(),
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(position_ms),
                "payload": _b64(payload),
            },
            "stream_id": s.stream_id,
        }

    def dtmf(self, s, digit):
        return {
            "event": "dtmf",
            "sequence_number": s._next_seq(),
            "stream_id": s.stream_id,
            "dtmf": {"digit": digit},
        }

    def stop(self, s):
        return {
            "event": "stop",
            "sequence_number": s._next_seq(),
            "stop": {"user_id": s.account_id, "call_control_id": s.call_id},
            "stream_id": s.stream_id,
        }

    def mark_ack(self, s, name):
        return {
            "event": "mark",
            "sequence_number": s._next_seq(),
            "stream_id": s.stream_id,
            "mark": {"name": name},
        }

    def check(self, s, message):
        if message.get("event") == "mark" and not isinstance(self.mark_name(message), str):
            return ["mark: mark.name missing"]
        return []

    def decode(self, s, message):
        raw, error = self.payload(message)
        if raw is None:
            return b"", [f"media: {error}"]
        errors = []
        if len(raw) % 2:
            errors.append(f"media: L16 payload of odd length {len(raw)}")
            raw = raw[:-1]
        if len(raw) < self.rate * self.min_chunk_ms // 1000 * 2:
            errors.append(f"media: {len(raw) // 2} samples is shorter than {self.min_chunk_ms} ms")
        return _swap16(raw), errors


class _Plivo(_Dialect):
    name = "plivo"
    rate = 16000
    audio_events = frozenset({"playAudio"})
    clear_events = frozenset({"clearAudio"})
    mark_events = frozenset({"checkpoint"})
    clear_acks_marks = False  # cleared checkpoints are never answered
    content_types = {"audio/x-l16": (8000, 16000), "audio/x-mulaw": (8000,)}

    def seq(self, n: int) -> Any:
        return n  # Plivo's sequence numbers and chunks are numbers; its timestamp a string

    def encode(self, pcm16: bytes) -> bytes:
        return pcm16  # audio/x-l16 is little-endian

    def opening(self, s, custom, extra):
        start = {
            "callId": s.call_id,
            "streamId": s.stream_id,
            "accountId": s.account_id,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000},
        }
        message: dict[str, Any] = {"event": "start", "sequenceNumber": s._next_seq(), "start": start}
        if custom:
            start["customParameters"] = dict(custom)
        message.update(self._extra(s))
        start.update(extra)
        return [message]

    def _extra(self, s) -> dict[str, Any]:
        return {"extra_headers": s._extra_headers} if s._extra_headers else {}

    def media(self, s, payload, chunk, position_ms):
        return {
            "event": "media",
            "sequenceNumber": s._next_seq(),
            "streamId": s.stream_id,
            "media": {
                "track": "inbound",
                "timestamp": str(int(time.time() * 1000)),
                "chunk": chunk,
                "payload": _b64(payload),
            },
            **self._extra(s),
        }

    def dtmf(self, s, digit):
        return {
            "event": "dtmf",
            "sequenceNumber": s._next_seq(),
            "streamId": s.stream_id,
            "dtmf": {"digit": digit, "track": "inbound"},
            **self._extra(s),
        }

    def stop(self, s):
        return {
            "event": "stop",
            "sequenceNumber": s._next_seq(),
            "streamId": s.stream_id,
            "stop": {"callId": s.call_id, "streamId": s.stream_id, "reason": "Stream ended"},
        }

    def mark_ack(self, s, name):
        return {
            "event": "playedStream",
            "sequenceNumber": s._next_seq(),
            "streamId": s.stream_id,
            "name": name,
        }

    def clear_ack(self, s):
        return {"sequenceNumber": s._next_seq(), "event": "clearedAudio", "streamId": s.stream_id}

    def mark_name(self, message):
        return message.get("name")

    def check(self, s, message):
        if message.get("event") == "checkpoint" and not isinstance(message.get("name"), str):
            return ["checkpoint: name missing"]
        return []

    def decode(self, s, message):
        media = message.get("media")
        if not isinstance(media, dict):
            return b"", ["playAudio: media missing"]
        content_type, rate = media.get("contentType"), media.get("sampleRate")
        if rate not in self.content_types.get(content_type, ()):
            return b"", [f"playAudio: unsupported contentType/sampleRate {content_type!r}/{rate!r}"]
        raw, error = self.payload(message)
        if raw is None:
            return b"", [f"playAudio: {error}"]
        errors = []
        if s._plivo_format not in (None, (content_type, rate)):
            errors.append(f"playAudio: switched format from {s._plivo_format} to {(content_type, rate)}")
        s._plivo_format = (content_type, rate)
        if (content_type, rate) != ("audio/x-l16", self.rate):
            errors.append(
                f"playAudio: {content_type};rate={rate} differs from the stream's "
                f"audio/x-l16;rate={self.rate}"
            )
        if content_type == "audio/x-mulaw":
            pcm = audioop.ulaw2lin(raw, 2)
        else:
            if len(raw) % 2:
                errors.append(f"playAudio: L16 payload of odd length {len(raw)}")
                raw = raw[:-1]
            pcm = raw
        if rate != self.rate:
            pcm, s._resample_state = audioop.ratecv(pcm, 2, 1, rate, self.rate, s._resample_state)
        return pcm, errors


_DIALECTS: dict[str, type[_Dialect]] = {"twilio": _Twilio, "telnyx": _Telnyx, "plivo": _Plivo}


# ---------------------------------------------------------------------------
# CarrierStream
# ---------------------------------------------------------------------------


class CarrierStream:
    """A carrier's side of one media stream WebSocket, for tests and benchmarks.

    ``received`` holds every message from the gateway in arrival order; the
    agent audio is decoded into s16le PCM at ``rate`` (`agent_audio`). Marks
    are acknowledged like the carrier does: with ``playback="realtime"`` (the
    default) once the audio queued before them has had time to play, with
    ``"instant"`` at once; a clear drops the queue (Twilio and Telnyx then
    return the pending marks, Plivo answers ``clearedAudio`` and never answers
    the cleared checkpoints). Deviations from the carrier's documented format
    in what the gateway sends are collected in ``format_errors``.
    """

    def __init__(
        self,
        carrier: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        playback: str = "realtime",
        open_timeout: float = 10.0,
    ) -> None:
        if carrier not in _DIALECTS:
            raise ValueError(f"unknown carrier {carrier!r}; expected one of {CARRIERS}")
        if playback not in ("realtime", "instant"):
            raise ValueError("playback must be 'realtime' or 'instant'")
        self.carrier = carrier
        self.url = url
        self.headers = dict(headers or {})
        self.playback = playback
        self.open_timeout = open_timeout
        self._dialect = _DIALECTS[carrier]()
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
        self._extra_headers = ""
        self._plivo_format: tuple[Any, Any] | None = None
        self._resample_state: Any = None

    # -- properties -----------------------------------------------------------

    @property
    def rate(self) -> int:
        """Sample rate of the caller's and the agent's audio on this stream."""
        return self._dialect.rate

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
        """Send the carrier's opening messages (``extra`` is merged into the ``start`` object)."""
        self._require_ws()
        self.call_id = call_id
        if self.carrier == "twilio":
            self.stream_id = stream_id or "MZ" + secrets.token_hex(16)
            self.account_id = account_id or "AC" + secrets.token_hex(16)
        elif self.carrier == "telnyx":
            self.stream_id = stream_id or str(uuid.uuid4())
            self.account_id = account_id or str(uuid.uuid4())
            self.session_id = str(uuid.uuid4())
        else:
            self.stream_id = stream_id or str(uuid.uuid4())
            alphabet = string.ascii_uppercase + string.digits
            self.account_id = account_id or "MA" + "".join(secrets.choice(alphabet) for _ in range(18))
        custom = dict(custom_parameters or {})
        if self.carrier == "plivo" and custom:
            self._extra_headers = ";".join(f"{k}={v}" for k, v in custom.items())
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
        message = self._dialect.media(self, self._dialect.encode(bytes(pcm16)), self._chunk, position_ms)
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
                self._spawn_send(self._dialect.mark_ack(self, name))
        ack = self._dialect.clear_ack(self)
        if ack is not None:
            self._spawn_send(ack)

