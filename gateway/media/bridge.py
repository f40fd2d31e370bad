"""Bridge mode: the carrier's media stream ⇄ Ultravox's serverWebSocket, relayed by the gateway.

Audio is forwarded as it arrives, never held back: the carrier's frames go to Ultravox as s16le
PCM at the carrier's own rate (no resampling when rates match), and Ultravox's audio goes to the
carrier in its encoding. Ultravox's playback_clear_buffer becomes the carrier's clear at once
(barge-in). A malformed frame is counted and skipped. When either side ends, the other is closed
and the carrier call hung up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx
import websockets
from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import inputs, statuses
from ..carriers.base import (
    Carrier,
    MalformedFrame,
    StreamAudio,
    StreamDtmf,
    StreamMark,
    StreamStart,
    StreamStop,
)
from ..http import RemoteError
from ..logs import bind_call
from ..store import CallRecord, CallStore, CallUpdate
from .codecs import AudioFormat, Chunker, Transcoder
from .recording import CallRecorder

log = logging.getLogger("gateway.media")

START_TIMEOUT_SECONDS = 10.0  # the carrier's start message, after the socket opens
JOIN_TIMEOUT_SECONDS = 5.0
LATE_AFTER_SECONDS = 0.06  # a caller frame this much behind its schedule counts as late
# When the agent hangs up, the carrier may still hold its last words; a mark tells us when they
# have played (or at most this long, whatever was queued).
GOODBYE_MARK = "gateway-goodbye"
MAX_GOODBYE_SECONDS = 10.0
# A handed-over call's old stream: how long the carrier may take to close it after the redirect.
HANDOVER_STREAM_SECONDS = 15.0


@dataclass
class MediaStats:
    """Per-call counters, stored on the call record and added to /metrics."""

    frames_in: int = 0  # caller → agent
    frames_out: int = 0  # agent → caller
    gaps: int = 0  # carrier timestamps jumping by more than a frame and a half
    late_frames: int = 0  # caller frames arriving behind the real-time schedule
    clears: int = 0  # barge-ins
    dtmf: int = 0
    malformed: int = 0


class _CallerClock:
    """Watches the caller's frames for gaps (carrier timestamps) and lateness (arrival times)."""

    def __init__(self, rate: int, bytes_per_sample: int, clock: Callable[[], float]):
        self._rate, self._width, self._clock = rate, bytes_per_sample, clock
        self._started: float | None = None
        self._audio_seconds = 0.0
        self._last_timestamp: float | None = None

    def frame(self, event: StreamAudio, stats: MediaStats) -> None:
        now = self._clock()
        duration = len(event.payload) / self._width / self._rate
        if self._started is None:
            self._started = now
        elif now - (self._started + self._audio_seconds) > LATE_AFTER_SECONDS:
            stats.late_frames += 1
            self._started = now - self._audio_seconds  # count each stall once, not every frame after it
        self._audio_seconds += duration
        if event.timestamp_ms is not None:
            if self._last_timestamp is not None and event.timestamp_ms - self._last_timestamp > 1500 * duration:
                stats.gaps += 1
            self._last_timestamp = event.timestamp_ms


async def _no_transfer(call_id: str) -> bool:
    return False


@dataclass
class _Session:
    """One bridged call's moving parts, for the relay and its clean-up."""

    carrier: Carrier
    websocket: WebSocket
    record: CallRecord
    stats: MediaStats
    ultravox: Any = None
    recorder: CallRecorder | None = None
    tasks: list = field(default_factory=list)
    failure: str | None = None
    hang_up: bool = False
    goodbye_played: asyncio.Event | None = None
    # Handed over to another replica (a drain): the Ultravox call is let go, the carrier is moving
    # the call to a fresh stream, and this stream's end is not the call's.
    handed_over: bool = False


class MediaBridge:
    def __init__(
        self,
        store: CallStore,
        carrier_http: httpx.AsyncClient,
        *,
        recordings: Callable[[CallRecord], Path | None] = lambda record: None,
        on_stats: Callable[[MediaStats], None] = lambda stats: None,
        transfer_active: Callable[[str], Awaitable[bool]] | None = None,
        clock=time.monotonic,
    ):
        self.store = store
        self.http = carrier_http
        self.recordings = recordings
        self.on_stats = on_stats
        self.transfer_active = transfer_active or _no_transfer
        self._clock = clock
        self.live: dict[str, _Session] = {}  # by the gateway's call id: the calls relayed now

    def relaying(self, call_id: str) -> bool:
        """Whether this process relays the call's audio now (a handed-over stream no longer counts:
        its call is moving to a new stream)."""
        session = self.live.get(call_id)
        return session is not None and not session.handed_over

    async def release(self, call_id: str) -> bool:
        """Let go of a live call's Ultravox call (which ends it) but keep the carrier's stream open
        until the carrier moves the call elsewhere: closing the stream would end a carrier call."""
        session = self.live.get(call_id)
        if session is None or session.ultravox is None or session.handed_over:
            return False
        session.handed_over = True
        with contextlib.suppress(Exception):
            await session.ultravox.close()
        return True

    async def run(
        self, carrier: Carrier, websocket: WebSocket, record: CallRecord, start: StreamStart | None = None
    ) -> MediaStats:
        """Relay one call until either side ends. `websocket` is the carrier's, already accepted;
        `start` is its start message if the caller of run has read it already."""
        stats = MediaStats()
        session = _Session(carrier, websocket, record, stats)
        self.live[record.id] = session
        with bind_call(record):
            try:
                await self._relay(session, start)
            finally:
                # Whatever happened (even cancellation at shutdown), both sockets close and the record says so.
                await asyncio.shield(self._clean_up(session))
                if self.live.get(record.id) is session:
                    del self.live[record.id]
        return stats

    async def _relay(self, session: "_Session", start: StreamStart | None) -> None:
        carrier, websocket, record, stats = session.carrier, session.websocket, session.record, session.stats
        start = start or await self.read_start(carrier, websocket, stats)
        stream_format = carrier.stream_format(start) if start is not None else None
        problem = None
        if start is None:
            problem = "the carrier's media stream never started"
        elif stream_format is None:
            problem = f"the carrier streams {start.encoding} at {start.rate} Hz, which the gateway cannot relay"
        if problem:
            log.warning("call %s: %s", record.id, problem)
            session.failure, session.hang_up = problem, True
            return
        assert start is not None and stream_format is not None  # else a problem above
        assert record.join_url is not None  # MediaSockets admits only calls with one
        try:
            session.ultravox = await asyncio.wait_for(
                websockets.connect(record.join_url, max_size=2**20, compression=None, open_timeout=JOIN_TIMEOUT_SECONDS),
                timeout=JOIN_TIMEOUT_SECONDS,
            )
        except (OSError, asyncio.TimeoutError, websockets.WebSocketException) as error:
            log.warning("call %s: cannot join Ultravox (%s); hanging up", record.id, error)
            session.failure, session.hang_up = f"could not join Ultravox: {error}", True
            return
        # The Ultravox call speaks the carrier's rate; a stream in another format is transcoded.
        transcoder = Transcoder(stream_format, carrier.media_rate)
        await self._start_recording(session, carrier.media_rate)
        caller = asyncio.create_task(self._caller_to_agent(session, transcoder, stream_format))
        agent = asyncio.create_task(self._agent_to_caller(session, start.stream_id, transcoder))
        session.tasks = [caller, agent]
        done, _ = await asyncio.wait({caller, agent}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            failure = None if task.cancelled() else task.exception()
            # The carrier closing its socket while audio was on its way to it is a hang-up, not a failure.
            if failure is not None and not isinstance(failure, WebSocketDisconnect) and not session.handed_over:
                log.error("call %s: media relay failed", record.id, exc_info=failure)
        if session.handed_over:
            # The carrier ends this stream once it has moved the call; until then its frames go nowhere.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(caller), timeout=HANDOVER_STREAM_SECONDS)
            return
        if agent in done:
            # The agent hung up: let the caller hear the goodbye still queued at the carrier first.
            session.hang_up = True
            await self._let_queued_audio_play(session, start.stream_id, caller)

    async def _start_recording(self, session: "_Session", rate: int) -> None:
        record = session.record
        path = self.recordings(record)
        if path is None:
            return
        try:
            session.recorder = await asyncio.to_thread(CallRecorder, path, rate, self._clock)
        except OSError as error:
            log.error("call %s: not recorded, cannot create %s: %s", record.id, path, error)
            return
        try:
            await self.store.add_recording(record.id, str(path))
        except Exception:
            # The recording goes on; only its listing on the call is missing.
            log.exception("call %s: could not list the recording %s on the call", record.id, path)

    async def _let_queued_audio_play(self, session: "_Session", stream_id: str, caller: asyncio.Task) -> None:
        if session.stats.frames_out == 0 or caller.done():
            return
        queued = session.recorder.agent_queued_seconds if session.recorder else MAX_GOODBYE_SECONDS
        session.goodbye_played = asyncio.Event()
        with contextlib.suppress(Exception):
            await send(session.websocket, session.carrier.media_mark(stream_id, GOODBYE_MARK))
            await asyncio.wait_for(session.goodbye_played.wait(), timeout=min(queued, MAX_GOODBYE_SECONDS) + 1)

    async def _clean_up(self, session: "_Session") -> None:
        for task in session.tasks:
            task.cancel()
        for task in session.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if session.ultravox is not None:
            with contextlib.suppress(Exception):
                await session.ultravox.close()
        await _close_carrier(session.websocket)
        if session.hang_up:
            await self._hang_up(session.carrier, session.record)
        try:
            await self._finish(session)
        except Exception:
            log.exception("call %s: could not record the end of the media stream", session.record.id)
        self.on_stats(session.stats)

    async def read_start(self, carrier: Carrier, websocket: WebSocket, stats: MediaStats) -> StreamStart | None:
        """The carrier's start message (after `connected`, if it sends one)."""
        deadline = self._clock() + START_TIMEOUT_SECONDS
        while (remaining := deadline - self._clock()) > 0:
            try:
                message = await asyncio.wait_for(websocket.receive(), timeout=remaining)
            except asyncio.TimeoutError:
                break
            if message["type"] == "websocket.disconnect":
                return None
            try:
                event = carrier.parse_media(message.get("text") or message.get("bytes") or b"")
            except MalformedFrame:
                stats.malformed += 1
                continue
            if isinstance(event, StreamStart):
                return event
            if isinstance(event, StreamStop):
                return None
        return None

    async def _caller_to_agent(self, session: "_Session", transcoder: Transcoder, carrier_format: AudioFormat) -> None:
        carrier, websocket = session.carrier, session.websocket
        recorder, stats = session.recorder, session.stats
        clock = _CallerClock(carrier_format.rate, carrier_format.bytes_per_sample, self._clock)
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                event = carrier.parse_media(message.get("text") or message.get("bytes") or b"")
            except MalformedFrame as error:
                stats.malformed += 1
                if stats.malformed <= 3 or stats.malformed % 100 == 0:
                    log.warning("%s media: skipped a malformed frame (%s); %d so far", carrier.name, error, stats.malformed)
                continue
            if session.handed_over:
                if isinstance(event, StreamStop):
                    return
                continue
            if isinstance(event, StreamAudio):
                pcm = transcoder.to_pcm(event.payload)
                await _to_agent(session, pcm)
                stats.frames_in += 1
                clock.frame(event, stats)
                if recorder:
                    recorder.caller(pcm)
            elif isinstance(event, StreamDtmf) and event.digit:
                stats.dtmf += 1
                await _to_agent(session, json.dumps({
                    "type": "user_text_message",
                    "text": f"(The caller pressed {event.digit} on the keypad.)",
                    "urgency": "immediate",
                }))
            elif isinstance(event, StreamMark) and event.name == GOODBYE_MARK and session.goodbye_played:
                session.goodbye_played.set()
            elif isinstance(event, StreamStop):
                return

    async def _agent_to_caller(self, session: "_Session", stream_id: str, transcoder: Transcoder) -> None:
        carrier, websocket, ultravox = session.carrier, session.websocket, session.ultravox
        recorder, stats = session.recorder, session.stats
        chunker = Chunker(transcoder.carrier_format.frame_bytes(carrier.media_chunk_ms) if carrier.media_chunk_ms else 1)
        async for message in ultravox:
            if isinstance(message, bytes):
                payload = chunker.take(transcoder.from_pcm(message))
                if payload:
                    await send(websocket, carrier.media_audio(stream_id, payload))
                    stats.frames_out += 1
                if recorder:
                    recorder.agent(message)
                continue
            try:
                data = inputs.json_document(message)  # bounded depth: a deep one is skipped, not fatal
            except ValueError:
                stats.malformed += 1
                continue
            kind = data.get("type") if isinstance(data, dict) else None
            if kind == "playback_clear_buffer":
                # Barge-in: the caller must stop hearing the agent now, not after the queue drains.
                await send(websocket, carrier.media_clear(stream_id))
                stats.clears += 1
                transcoder.reset_outbound()  # a resampler must not carry the dropped audio's tail
                chunker.clear()
                if recorder:
                    recorder.clear()
            elif kind == "client_tool_invocation":
                # The gateway's tools are HTTP tools; an unknown client tool must not freeze the call.
                await ultravox.send(json.dumps({
                    "type": "client_tool_result", "invocationId": data.get("invocationId"),
                    "errorType": "undefined", "errorMessage": f"no client tool named {data.get('toolName')!r}",
                }))

    async def _hang_up(self, carrier: Carrier, record: CallRecord) -> None:
        if not record.carrier_call_id:
            return
        try:
            await carrier.hang_up(self.http, record.carrier_call_id, deadline=self._clock() + 10)
        except RemoteError as error:
            log.warning("call %s: hang-up failed: %s", record.id, error.reason)

    async def _finish(self, session: "_Session") -> None:
        record = session.record
        if session.recorder:
            try:
                await asyncio.to_thread(session.recorder.close)
            except OSError as error:
                log.error("call %s: recording incomplete: %s", record.id, error)
        await self.store.record_media(record.id, asdict(session.stats))
        if session.handed_over:
            return  # the call goes on, on another stream
        if session.failure:
            await self.store.update(record.id, CallUpdate(status=statuses.FAILED, failure_reason=session.failure))
        elif not await self.transfer_active(record.id):
            # Over, unless the stream ended because a transfer moved the caller elsewhere.
            await self.store.update(record.id, CallUpdate(status=statuses.COMPLETED, provisional=True))


async def _to_agent(session: "_Session", message: str | bytes) -> None:
    try:
        await session.ultravox.send(message)
    except websockets.ConnectionClosed:
        if not session.handed_over:  # let go on purpose: the caller's frames go nowhere until the move
            raise


async def _close_carrier(websocket: WebSocket) -> None:
    with contextlib.suppress(Exception):  # already closed by the carrier: nothing to do
        await websocket.close()


async def send(websocket: WebSocket, message: str | bytes) -> None:
    """One message to the carrier, in a text or a binary frame as its stream protocol has it."""
    if isinstance(message, bytes):
        await websocket.send_bytes(message)
    else:
        await websocket.send_text(message)
