"""`gateway simulate`: a carrier's call into a bridged route, played from a WAV, recorded to a WAV.

The webhook is signed as the carrier signs it (Twilio and Plivo with the auth token from the
configuration; Telnyx with a private key matching TELNYX_PUBLIC_KEY, as in a test setup), so the
running gateway treats the call like a real one, signatures and media token included.
"""

from __future__ import annotations

import asyncio
import base64
import wave
import xml.etree.ElementTree as ET
from urllib.parse import urlencode

import httpx
import numpy as np

from ..http import as_websocket_url
from ..settings import Settings
from ..testing import CarrierStream, twilio_stream_headers
from .codecs import Resampler

RATES = {"twilio": 8000, "telnyx": 16000, "plivo": 16000}


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


def _signed_webhook(settings: Settings, carrier: str, to: str, from_: str, telnyx_private_key: str | None):
    from .. import testing

    url = f"{settings.public_url}/{carrier}/inbound"
    if carrier == "twilio":
        if not settings.twilio.auth_token:
            raise SimulationError("TWILIO_AUTH_TOKEN is needed to sign the webhook")
        form = testing.twilio_inbound_form(from_=from_, to=to)
        return form, {"X-Twilio-Signature": testing.twilio_signature(settings.twilio.auth_token, url, form)}
    if carrier == "plivo":
        if not settings.plivo.auth_token:
            raise SimulationError("PLIVO_AUTH_TOKEN is needed to sign the webhook")
        form = testing.plivo_inbound_form(from_=from_, to=to)
        return form, testing.plivo_v3_headers(settings.plivo.auth_token, url, form)
    if not telnyx_private_key:
        raise SimulationError("--telnyx-private-key is needed: only the matching private key can sign as Telnyx")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signer = testing.TelnyxSigner(Ed25519PrivateKey.from_private_bytes(base64.b64decode(telnyx_private_key)))
    form = testing.telnyx_inbound_form(from_=from_, to=to)
    return form, signer.headers(urlencode(form).encode())


async def simulate_call(
    settings: Settings, *, carrier: str, to: str, from_: str, input_path: str, output_path: str,
    gateway_url: str, tail_seconds: float = 3.0, telnyx_private_key: str | None = None,
) -> str:
    if not settings.public_url:
        raise SimulationError("GATEWAY_PUBLIC_URL is needed: carriers sign and stream to the public URL")
    rate = RATES[carrier]
    caller_audio = read_wav(input_path, rate)
    form, headers = _signed_webhook(settings, carrier, to, from_, telnyx_private_key)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=20) as client:
        try:
            response = await client.post(f"/{carrier}/inbound", content=urlencode(form), headers={
                **headers, "content-type": "application/x-www-form-urlencoded"})
        except httpx.HTTPError as error:
            raise SimulationError(f"cannot reach the gateway at {gateway_url}: {error}") from None
    if response.status_code != 200:
        raise SimulationError(f"the gateway answered {response.status_code}: {response.text.strip()}")
    root = ET.fromstring(response.text)
    stream = root.find("Stream") if carrier == "plivo" else root.find("Connect/Stream")
    stream_url = (stream.text if carrier == "plivo" else stream.get("url")) if stream is not None else None
    if not stream_url or "/media/" not in stream_url:
        raise SimulationError(f"the route for {to} is not in bridge mode (the gateway answered: {response.text})")
    public_ws = as_websocket_url(settings.public_url)
    local_ws = as_websocket_url(gateway_url).rstrip("/")
    local_url = local_ws + stream_url[len(public_ws):]
    stream_headers = twilio_stream_headers(settings.twilio.auth_token, stream_url) if carrier == "twilio" else None
    call_id = form["CallUUID"] if carrier == "plivo" else form["CallSid"]
    async with CarrierStream(carrier, local_url, headers=stream_headers) as carrier_stream:
        await carrier_stream.start(call_id=call_id)
        await carrier_stream.play(caller_audio)
        await asyncio.sleep(tail_seconds)
        await carrier_stream.stop()
        agent_audio = carrier_stream.agent_audio()
        clears = len(carrier_stream.of_kind("clear"))
    write_wav(output_path, agent_audio, rate)
    return (f"played {len(caller_audio) / 2 / rate:.1f} s as a {carrier} caller to {to}; "
            f"the agent said {len(agent_audio) / 2 / rate:.1f} s (written to {output_path}), with {clears} barge-in clear(s)")
