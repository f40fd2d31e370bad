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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

import httpx
import websockets
from starlette.websockets import WebSocket

from .. import statuses
from ..carriers.base import (
    Carrier,
    MalformedFrame,
    StreamAudio,
    StreamDtmf,
    StreamStart,
    StreamStop,
)
from ..http import RemoteError
from ..security import media_token
from ..settings import Settings
from ..store import CallRecord, CallStore
from .codecs import AudioFormat, Transcoder
from .recording import CallRecorder

log = logging.getLogger("gateway.media")

START_TIMEOUT_SECONDS = 10.0  # the carrier's start message, after the socket opens
JOIN_TIMEOUT_SECONDS = 5.0
# Ultravox's advice with clear support: a large client buffer, so its audio flows ahead smoothly.
CLIENT_BUFFER_MS = 30000
LATE_AFTER_SECONDS = 0.06  # a caller frame this much behind its schedule counts as late


# The carrier opens the media socket right after fetching the XML; a token older than this is stale.
TOKEN_LIFETIME_SECONDS = 60


def stream_url(settings: Settings, carrier: Carrier, carrier_call_id: str, now: float | None = None) -> str:
    """The gateway's media socket for one call, as the carrier is told to open it."""
    expires = int((now if now is not None else time.time()) + TOKEN_LIFETIME_SECONDS)
    token = media_token(settings.ultravox.api_key or "", carrier.name, carrier_call_id, expires)
    base = (settings.public_url or "").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return f"{base}/media/{carrier.name}?{urlencode({'call': carrier_call_id, 'token': token})}"


def bridged(settings: Settings, record: CallRecord) -> bool:
    route = settings.route_named(record.route) if record.route else None
    return bool(route and route.mode == "bridge")


def server_websocket_medium(carrier: Carrier) -> dict[str, Any]:
    return {"serverWebSocket": {
        "inputSampleRate": carrier.media_rate,
        "outputSampleRate": carrier.media_rate,
        "clientBufferSizeMs": CLIENT_BUFFER_MS,
    }}


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


class MediaBridge:
    def __init__(
        self,
        store: CallStore,
        carrier_http: httpx.AsyncClient,
        *,
        recordings: Callable[[CallRecord], Path | None] = lambda record: None,
        on_stats: Callable[[MediaStats], None] = lambda stats: None,
        clock=time.monotonic,
    ):
        self.store = store
        self.http = carrier_http
        self.recordings = recordings
        self.on_stats = on_stats
        self._clock = clock

    async def run(self, carrier: Carrier, websocket: WebSocket, record: CallRecord) -> MediaStats:
        """Relay one call until either side ends. `websocket` is the carrier's, already accepted."""
        stats = MediaStats()
        start = await self._start(carrier, websocket, stats)
        if start is None:
            await _close_carrier(websocket)
            return stats
        try:
            ultravox = await asyncio.wait_for(
                websockets.connect(record.join_url, max_size=2**20, compression=None, open_timeout=JOIN_TIMEOUT_SECONDS),
                timeout=JOIN_TIMEOUT_SECONDS,
            )
        except (OSError, asyncio.TimeoutError, websockets.WebSocketException) as error:
            log.warning("call %s: cannot join Ultravox (%s); hanging up", record.id, error)
            await self.store.update(record.id, statuses.FAILED, failure_reason=f"could not join Ultravox: {error}")
            await _close_carrier(websocket)
            await self._hang_up(carrier, record)
            return stats

        carrier_format = AudioFormat(carrier.media_encoding, carrier.media_rate)
        transcoder = Transcoder(carrier_format, carrier.media_rate)
        path = self.recordings(record)
        recorder = CallRecorder(path, carrier.media_rate, self._clock) if path else None
        caller = asyncio.create_task(
            self._caller_to_agent(carrier, websocket, ultravox, transcoder, carrier_format, recorder, stats)
        )
        agent = asyncio.create_task(
            self._agent_to_caller(carrier, websocket, ultravox, start.stream_id, transcoder, recorder, stats)
        )
        done, pending = await asyncio.wait({caller, agent}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in (*done, *pending):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        agent_ended = agent in done
        await ultravox.close()
        await _close_carrier(websocket)
        if agent_ended:
            await self._hang_up(carrier, record)
        await self._finish(record, stats, recorder)
        return stats

    async def _start(self, carrier: Carrier, websocket: WebSocket, stats: MediaStats) -> StreamStart | None:
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
        log.warning("%s media stream sent no start message", carrier.name)
        return None

    async def _caller_to_agent(self, carrier, websocket, ultravox, transcoder, carrier_format, recorder, stats) -> None:
        clock = _CallerClock(carrier.media_rate, carrier_format.bytes_per_sample, self._clock)
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
            if isinstance(event, StreamAudio):
                pcm = transcoder.to_pcm(event.payload)
                await ultravox.send(pcm)
                stats.frames_in += 1
                clock.frame(event, stats)
                if recorder:
                    recorder.caller(pcm)
            elif isinstance(event, StreamDtmf) and event.digit:
                stats.dtmf += 1
                await ultravox.send(json.dumps({
                    "type": "user_text_message",
                    "text": f"(The caller pressed {event.digit} on the keypad.)",
                    "urgency": "immediate",
                }))
            elif isinstance(event, StreamStop):
                return

    async def _agent_to_caller(self, carrier, websocket, ultravox, stream_id, transcoder, recorder, stats) -> None:
        async for message in ultravox:
            if isinstance(message, bytes):
                await websocket.send_text(carrier.media_audio(stream_id, transcoder.from_pcm(message)))
                stats.frames_out += 1
                if recorder:
                    recorder.agent(message)
                continue
            try:
                data = json.loads(message)
            except ValueError:
                stats.malformed += 1
                continue
            kind = data.get("type") if isinstance(data, dict) else None
            if kind == "playback_clear_buffer":
                # Barge-in: the caller must stop hearing the agent now, not after the queue drains.
                await websocket.send_text(carrier.media_clear(stream_id))
                stats.clears += 1
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

    async def _finish(self, record: CallRecord, stats: MediaStats, recorder: CallRecorder | None) -> None:
        details: dict[str, Any] = {"media_stats": json.dumps(asdict(stats))}
        if recorder:
            try:
                details["recording_path"] = str(await asyncio.to_thread(recorder.write))
            except OSError as error:
                log.error("call %s: recording not written: %s", record.id, error)
        await self.store.update(record.id, replace=details)
        self.on_stats(stats)


async def _close_carrier(websocket: WebSocket) -> None:
    with contextlib.suppress(Exception):  # already closed by the carrier: nothing to do
        await websocket.close()
