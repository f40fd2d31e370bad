"""`gateway simulate`: a carrier's call into a bridged route, played from a WAV, recorded to a WAV.

The carrier's side is played with the carrier module's own wire format (its webhook, signature
and stream messages: the `simulated_*` members of gateway.carriers.base.Carrier), so the running
gateway treats the call like a real one, signatures and media token included. Carriers that sign
with a private key the gateway does not hold (Telnyx) need it given (`--private-key`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import wave
from urllib.parse import urlencode

import httpx
import numpy as np
import websockets

from ..carriers import CARRIERS
from ..carriers.base import QUERY, Carrier, MalformedFrame, StreamAudio, StreamClear, StreamMark
from ..http import as_websocket_url
from ..settings import Settings
from .codecs import AudioFormat, Resampler, decode, encode

FRAME_MS = 20


class SimulationError(Exception):
    pass


def read_wav(path: str, rate: int) -> bytes:
    """Mono s16le at `rate` from a 16-bit WAV (the left channel of a stereo one)."""
    try:
        with wave.open(path, "rb") as source:
            if source.getsampwidth() != 2:
                raise SimulationError(f"{path}: only 16-bit WAV files are supported")
            frames = np.frombuffer(source.readframes(source.getnframes()), dtype="<i2")
            frames = frames.reshape(-1, source.getnchannels())[:, 0]
            source_rate = source.getframerate()
    except (OSError, wave.Error) as error:
        raise SimulationError(f"cannot read {path}: {error}") from None
    return Resampler(source_rate, rate).convert(frames.astype("<i2").tobytes())


def write_wav(path: str, pcm: bytes, rate: int) -> None:
    with wave.open(path, "wb") as target:
        target.setnchannels(1)
        target.setsampwidth(2)
        target.setframerate(rate)
        target.writeframes(pcm)


async def _inbound_webhook(
    client: httpx.AsyncClient, carrier: Carrier, url: str, *, from_: str, to: str, private_key: str | None,
) -> tuple[str, httpx.Response]:
    """The carrier announcing a new call, in its webhook format and signed as it signs."""
    call = carrier.simulated_inbound(from_=from_, to=to)
    webhook_format = carrier.webhook_formats[0]
    if webhook_format is QUERY:
        url, body, headers = f"{url}?{urlencode(call.params)}", b"", {}
    elif webhook_format.name == "json":
        body, headers = json.dumps(call.params).encode(), {"content-type": str(webhook_format.content_type)}
    else:
        body, headers = urlencode(call.params).encode(), {"content-type": str(webhook_format.content_type)}
    try:
        headers.update(carrier.simulated_signature(url, call.params, body, private_key))
    except ValueError as error:
        raise SimulationError(str(error)) from None
    path = url.split("://", 1)[1].split("/", 1)[1]
    try:
        response = await client.request(webhook_format.method, "/" + path, content=body or None, headers=headers)
    except httpx.HTTPError as error:
        raise SimulationError(f"cannot reach the gateway: {error}") from None
    return call.call_id, response


async def _play(carrier: Carrier, url: str, headers: dict[str, str], call_id: str, parameters: dict[str, str],
                caller_pcm: bytes, tail_seconds: float, pace: float = 1.0) -> tuple[bytes, int]:
    """The carrier's media stream: the caller's audio at real-time pace (`pace` times faster); returns
    the agent's audio (s16le at the carrier's rate) and the number of barge-in clears."""
    audio_format = AudioFormat(carrier.media_encoding, carrier.media_rate)
    stream_id = secrets.token_hex(16)
    agent, clears = bytearray(), 0
    async with websockets.connect(url, additional_headers=headers, max_size=2**20, open_timeout=10) as socket:
        async def listen() -> None:
            nonlocal clears
            async for message in socket:
                try:
                    event = carrier.parse_outgoing(message)
                except MalformedFrame:
                    continue
                if isinstance(event, StreamAudio):
                    agent.extend(decode(audio_format, event.payload))
                elif isinstance(event, StreamMark):  # played at once: nothing is queued here
                    await socket.send(carrier.simulated_mark_played(stream_id, event.name))
                elif isinstance(event, StreamClear):
                    clears += 1

        listener = asyncio.create_task(listen())
        for message in carrier.simulated_start(stream_id, call_id, parameters):
            await socket.send(message)
        frame = carrier.media_rate * 2 * FRAME_MS // 1000
        started = time.monotonic()
        for sequence, offset in enumerate(range(0, len(caller_pcm), frame), start=2):
            chunk = encode(audio_format, caller_pcm[offset:offset + frame])
            await socket.send(carrier.simulated_audio(stream_id, chunk, sequence, offset // frame * FRAME_MS))
            due = started + (offset + frame) / 2 / carrier.media_rate / pace
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        await asyncio.sleep(tail_seconds)
        with contextlib.suppress(websockets.ConnectionClosed):
            await socket.send(carrier.simulated_stop(stream_id))
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
            await listener
    return bytes(agent), clears


async def simulate_call(
    settings: Settings, *, carrier: str, to: str, from_: str, input_path: str, output_path: str,
    gateway_url: str, tail_seconds: float = 3.0, private_key: str | None = None, pace: float = 1.0,
) -> str:
    from ..app import create_app

    if not settings.public_url:
        raise SimulationError("GATEWAY_PUBLIC_URL is needed: carriers sign and stream to the public URL")
    # Said before anything is sent when the configuration read here has routes (the gateway's, with
    # --config); without any (secrets from the environment alone) the gateway's answer tells.
    route = settings.route_for(to)
    if settings.routes and route is None:
        raise SimulationError(f"no route for {to}, and no default route (number = \"*\"): add a [[routes]] with "
                              f"number = \"{to}\" and mode = \"bridge\"")
    if route is not None and route.mode != "bridge":
        raise SimulationError(
            f"the route for {to} ({route.name}) is in direct mode: the carrier would stream to Ultravox itself, and "
            "no audio would pass the gateway to play or record here. Set mode = \"bridge\" on it to simulate it")
    speaker = CARRIERS[carrier](settings)
    rate = speaker.media_rate
    caller_audio = read_wav(input_path, rate)
    inbound_url = create_app(settings).state.gateway.urls.public("inbound", carrier=carrier)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=20) as client:
        call_id, response = await _inbound_webhook(client, speaker, inbound_url, from_=from_, to=to,
                                                   private_key=private_key)
        if response.status_code in (401, 403):
            raise SimulationError(
                f"the gateway refused the {speaker.title} webhook ({response.status_code}: {response.text.strip()}). "
                f"It must run with the configuration this command read: public_url {settings.public_url} and the "
                f"same {speaker.title} credentials (its log says what it checked)")
        if response.status_code != 200:
            raise SimulationError(f"the gateway answered {response.status_code}: {response.text.strip()}")
        stream = speaker.connected_stream(response.text)
        public_ws = as_websocket_url(settings.public_url)
        if stream is None:
            raise SimulationError(await _why_not_connected(client, settings, speaker, call_id, response.text))
    if not stream[0].startswith(public_ws):
        raise SimulationError(
            f"the running gateway connected the call straight to Ultravox ({stream[0].split('?')[0]}): there, the "
            f"route for {to} is in direct mode. Is it running with the configuration this command read?")
    stream_url, parameters = stream
    local_url = as_websocket_url(gateway_url).rstrip("/") + stream_url[len(public_ws):]
    # The upgrade is signed (where the carrier signs it) for the public URL it was given.
    agent_audio, clears = await _play(speaker, local_url, speaker.simulated_upgrade_headers(stream_url), call_id,
                                      parameters, caller_audio, tail_seconds, pace)
    write_wav(output_path, agent_audio, rate)
    return (f"played {len(caller_audio) / 2 / rate:.1f} s as a caller on {speaker.title} to {to}; "
            f"the agent said {len(agent_audio) / 2 / rate:.1f} s (written to {output_path}), with {clears} barge-in clear(s)")


async def _why_not_connected(client: httpx.AsyncClient, settings: Settings, carrier: Carrier, call_id: str,
                             answer: str) -> str:
    """Why the gateway answered the call with its apology instead of a stream, as far as can be told
    from here: its readiness, the call's record (with an API key), and Ultravox reached from here."""
    from ..online import probe_ultravox
    from ..http import create_client

    with contextlib.suppress(httpx.HTTPError, ValueError):
        ready = (await client.get("/readyz")).json()
        problems = ready.get("problems", [])
        if any("ULTRAVOX_API_KEY" in problem for problem in problems):
            return ("the gateway has no Ultravox API key (ULTRAVOX_API_KEY, or [ultravox] api_key), so it answers "
                    "every call with its apology")
        if any("no routes" in problem for problem in problems):
            return "the gateway has no [[routes]]: every call hears its no-route message"
    reason = None
    reader = next((key for key in settings.api_keys if "read" in key.permissions and not key.scoped), None)
    if reader is not None:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            listed = await client.get("/v1/calls", params={"carrier": carrier.name, "direction": "inbound"},
                                      headers={"Authorization": f"Bearer {reader.key}"})
            record = next((c for c in listed.json()["calls"] if c.get("carrier_call_id") == call_id), None)
            reason = record and record.get("failure_reason")
    async with create_client(pool_size=1, timeout=10) as http:
        probe = await probe_ultravox(settings, http)
    here = "" if probe.outcome == "ok" else f"; from here, {probe.detail}"
    if reason:
        return f"the gateway could not create the Ultravox call ({reason}), so the caller heard its apology{here}"
    if here:
        return f"the gateway answered with its apology instead of a stream{here}"
    return f"the gateway answered with its apology instead of a stream (its log says why): {answer.strip()}"
