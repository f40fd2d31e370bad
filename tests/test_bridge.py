"""Bridge mode end to end: carrier media socket ⇄ gateway ⇄ fake Ultravox serverWebSocket, on loopback."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import wave

import numpy as np
import pytest
import websockets

from gateway.carriers import CARRIERS
from gateway.security import media_token
from gateway.testing import CarrierStream, double, twilio_stream_headers

from .conftest import (
    AGENT_ID,
    API_KEY,
    CARRIER_NAMES,
    REST_HANGUP_CARRIERS,
    TRANSFER_CARRIERS,
    ULTRAVOX_DIAL_CARRIERS,
)

BRIDGED_NUMBER = "+15550005555"
TWILIO_TOKEN = double("twilio").auth_token


def speech(rate: int, seconds: float = 1.0) -> bytes:
    """Voiced-speech-like audio: a gliding pitch with harmonics and a syllable envelope."""
    t = np.arange(int(rate * seconds)) / rate
    pitch = 120 + 40 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12) if k * 180 < 3400)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    return (voice / np.max(np.abs(voice)) * envelope * 12000).astype("<i2").tobytes()


def snr_db(sent: bytes, got: bytes) -> float:
    a = np.frombuffer(sent, dtype="<i2").astype(float)
    b = np.frombuffer(got, dtype="<i2").astype(float)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return 10 * np.log10(np.sum(a * a) / max(np.sum((a - b) ** 2), 1e-9))


class BridgedCall:
    def __init__(self, gateway, fake_ultravox, carrier):
        self.gateway, self.ultravox, self.carrier = gateway, fake_ultravox, carrier
        self.double = double(carrier)
        self.form = self.double.inbound_form(to=BRIDGED_NUMBER)
        self.carrier_call_id = self.form[self.double.call_id_param]
        response = gateway.post(carrier, self.form)
        assert response.status_code == 200, response.text
        self.public_stream_url, _ = self.double.connected_url(response.text)
        self.parameters = self.double.stream_parameters(response.text)
        self.ultravox_request = fake_ultravox.requests[-1]

    @property
    def rate(self) -> int:
        return self.double.stream_rate

    @property
    def local_url(self) -> str:
        """Where the carrier would connect, reached on loopback (the signature stays on the public URL)."""
        return local(self.gateway, self.public_stream_url)

    def stream(self, url: str | None = None, *, signed: bool = True, codec: str | None = None) -> CarrierStream:
        headers = self.double.stream_headers(self.public_stream_url) if signed else None
        return CarrierStream(self.carrier, url or self.local_url, headers=headers, parameters=self.parameters,
                             codec=codec)

    def talk(self, seconds: float) -> None:
        """A whole short call: the stream starts, the caller speaks `seconds`, the stream stops."""

        async def scenario():
            async with self.stream() as stream:
                await stream.start(call_id=self.carrier_call_id)
                await stream.play(speech(self.rate, seconds))
                await stream.stop()

        asyncio.run(scenario())

    def record(self):
        (record,) = [r for r in self.gateway.records() if r.carrier_call_id == self.carrier_call_id]
        return record


def media_credentials(carrier: str, stream_url: str, parameters: dict[str, str]) -> dict[str, str]:
    """The call and token an answer gives the gateway's media socket: in the stream URL's query, or
    (carriers whose stream URLs take none) in the stream's parameters only."""
    from urllib.parse import parse_qs

    base, _, query = stream_url.partition("?")
    assert base == f"wss://gateway.example.test/media/{carrier}"
    if double(carrier).stream_url_takes_query:
        return {name: values[0] for name, values in parse_qs(query).items()}
    assert query == "" and set(parameters) == {"call", "token"}
    return parameters


def local(gateway, public_stream_url: str) -> str:
    """A public stream URL as reached on loopback."""
    return public_stream_url.replace("wss://gateway.example.test", gateway.server.url.replace("http", "ws"))


@pytest.fixture
def bridged(make_gateway, fake_ultravox, tmp_path):
    gateway = make_gateway(f"""
[[routes]]
number = "{BRIDGED_NUMBER}"
name = "bridged"
agent_id = "{AGENT_ID}"
mode = "bridge"
recording_dir = "{tmp_path / 'recordings'}"
operators = ["sales"]
""")
    return lambda carrier: BridgedCall(gateway, fake_ultravox, carrier)


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_audio_round_trips_through_each_carrier_protocol(bridged, carrier):
    call = bridged(carrier)
    medium = call.ultravox_request.body["medium"]["serverWebSocket"]
    assert medium == {"inputSampleRate": call.rate, "outputSampleRate": call.rate, "clientBufferSizeMs": 30000}
    assert set(media_credentials(carrier, call.public_stream_url, call.parameters)) == {"call", "token"}
    sent = speech(call.rate, 1.0)

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            await stream.play(sent)
            await asyncio.sleep(0.3)  # the echo of the last frames
            await stream.stop()
            return stream.agent_audio(), stream.format_errors

    got, errors = asyncio.run(scenario())
    assert errors == []
    session = call.ultravox.sessions[call.ultravox.created_calls[-1]["callId"]]
    # What Ultravox heard is the caller's audio as s16le at the carrier's rate (bit-exact over linear PCM)…
    assert snr_db(sent, bytes(session.audio_in)) > (90 if call.double.stream_lossless else 30)
    # …and what the caller heard back (Ultravox echoing) survived the trip both ways.
    assert snr_db(sent, got) > (90 if call.double.stream_lossless else 28)
    assert wait_until(lambda: call.record().media_stats is not None)
    stats = json.loads(call.record().media_stats)
    assert stats["frames_in"] == 50 and stats["frames_out"] >= 45 and stats["malformed"] == 0


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_barge_in_clear_reaches_the_carrier_within_a_frame(bridged, carrier):
    call = bridged(carrier)
    call.ultravox.media_mode = "silent"

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            session = await asyncio.to_thread(call.ultravox.wait_for_session)
            delays = []
            for _ in range(5):
                # A burst of agent audio, and the caller talks over it at once.
                await asyncio.to_thread(session.send_audio, speech(call.rate, 0.2))
                sent_at = time.monotonic()
                await asyncio.to_thread(session.send_json, {"type": "playback_clear_buffer"})
                clears = await stream.wait_for("clear", count=len(delays) + 1)
                delays.append(clears[-1].at - sent_at)
            await stream.stop()
            return delays

    delays = asyncio.run(scenario())
    assert statistics.median(delays) < 0.020, delays  # one 20 ms frame
    assert json.loads(wait_and_get_stats(call))["clears"] == 5


def wait_and_get_stats(call):
    assert wait_until(lambda: call.record().media_stats is not None)
    return call.record().media_stats


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_keypad_digits_reach_the_agent_and_bad_frames_are_skipped(bridged, carrier):
    call = bridged(carrier)

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            session = await asyncio.to_thread(call.ultravox.wait_for_session)
            await stream.send_raw("this is not json")
            await stream.send_raw(json.dumps({"event": "media", "media": {"payload": "%%% not base64"}}))
            await stream.send_raw(b"\x00\x01binary")
            await stream.send_raw(json.dumps(["no", "event"]))
            await stream.send_dtmf("5")
            await stream.play(speech(call.rate, 0.2))
            messages = await asyncio.to_thread(session.wait_for_message, "user_text_message")
            await asyncio.sleep(0.1)
            frames = session.frames_in
            await stream.stop()
            return messages, frames

    messages, frames = asyncio.run(scenario())
    assert "pressed 5" in messages[-1]["text"]
    assert frames == 10  # the call carried on past every bad frame
    stats = json.loads(wait_and_get_stats(call))
    assert stats["malformed"] == 4 and stats["dtmf"] == 1


@pytest.mark.parametrize("carrier", REST_HANGUP_CARRIERS)
def test_agent_hanging_up_closes_the_carrier_socket_and_hangs_up_the_call(bridged, fake_carriers, carrier):
    call = bridged(carrier)
    fake_carriers[carrier].live_calls.add(call.carrier_call_id)

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            session = await asyncio.to_thread(call.ultravox.wait_for_session)
            await asyncio.to_thread(session.hang_up)
            return await stream.wait_closed(timeout=5)

    asyncio.run(scenario())
    assert wait_until(lambda: any(
        u.call_id == call.carrier_call_id for u in fake_carriers[carrier].updates
    ))


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_caller_hanging_up_closes_the_ultravox_socket(bridged, carrier):
    call = bridged(carrier)

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            session = await asyncio.to_thread(call.ultravox.wait_for_session)
            await stream.play(speech(call.rate, 0.1))
            return session

    session = asyncio.run(scenario())  # leaving the block closes the carrier's socket
    assert session.closed.wait(5)


def _refused(url, headers=None):
    async def scenario():
        try:
            async with websockets.connect(url, additional_headers=headers, open_timeout=5):
                return None
        except websockets.InvalidStatus as error:
            return error.response.status_code

    return asyncio.run(scenario())


def test_bad_expired_and_reused_tokens_are_refused(bridged, gateway):
    call = bridged("plivo")
    base = call.local_url.split("?")[0]
    assert _refused(f"{base}?call={call.carrier_call_id}&token=123.abc") == 403
    assert _refused(f"{base}?call=someone-else&{call.local_url.split('&', 1)[1]}") == 403
    expired = media_token(gateway.settings.ultravox.api_key, "plivo", call.carrier_call_id, int(time.time()) - 1)
    assert _refused(f"{base}?call={call.carrier_call_id}&token={expired}") == 403

    async def first_use():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            await asyncio.to_thread(call.ultravox.wait_for_session)

    asyncio.run(first_use())
    assert _refused(call.local_url) == 403  # a token opens one socket only


def test_twilio_media_socket_needs_twilios_signature(bridged):
    call = bridged("twilio")
    assert _refused(call.local_url) == 403
    assert _refused(call.local_url, twilio_stream_headers("not-the-token", call.public_stream_url)) == 403
    https_spelling = call.public_stream_url.replace("wss://", "https://")

    async def signed_as_https():
        async with CarrierStream("twilio", call.local_url, headers=twilio_stream_headers(TWILIO_TOKEN, https_spelling),
                                 parameters=call.parameters) as s:
            await s.start(call_id=call.carrier_call_id)
            await asyncio.to_thread(call.ultravox.wait_for_session)

    asyncio.run(signed_as_https())


def test_recording_has_the_caller_left_and_the_agent_right(bridged):
    call = bridged("twilio")
    call.ultravox.media_mode = "silent"
    call.ultravox.greeting = speech(call.rate, 0.5)

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            await asyncio.sleep(0.7)  # the agent's greeting, while the caller is silent
            await stream.play(speech(call.rate, 0.5))
            await stream.stop()

    asyncio.run(scenario())
    assert wait_until(lambda: call.record().recording_path is not None)
    with wave.open(call.record().recording_path) as recording:
        assert (recording.getnchannels(), recording.getframerate(), recording.getsampwidth()) == (2, call.rate, 2)
        audio = np.frombuffer(recording.readframes(recording.getnframes()), dtype="<i2").reshape(-1, 2)
    caller, agent = audio[:, 0].astype(float), audio[:, 1].astype(float)
    # The agent speaks first, then the caller: their energy sits in different halves of the call.
    half = len(audio) // 2
    assert np.abs(agent[:half]).mean() > 5 * np.abs(agent[half:]).mean() + 1
    assert np.abs(caller[half:]).mean() > 5 * np.abs(caller[:half]).mean() + 1
    view = call.gateway.client.get(f"/v1/calls/{call.record().id}", headers={"Authorization": f"Bearer {API_KEY}"})
    assert view.json()["recording_path"].endswith(".wav")


def test_media_counters_in_metrics(bridged):
    call = bridged("plivo")

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            await stream.play(speech(call.rate, 0.2))
            await asyncio.sleep(0.2)
            await stream.stop()

    asyncio.run(scenario())
    wait_and_get_stats(call)
    metrics = call.gateway.client.get("/metrics").text
    assert 'gateway_media_frames_total{direction="caller_to_agent"} 10.0' in metrics


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_gateway_simulate_plays_a_wav_and_records_the_agent(bridged, tmp_path, monkeypatch, carrier):
    import base64

    from cryptography.hazmat.primitives import serialization

    from gateway.cli import main as cli_main

    call = bridged(carrier)  # a first call proves the route; the CLI places its own
    gateway = call.gateway
    rate = call.rate
    source = tmp_path / "caller.wav"
    with wave.open(str(source), "wb") as out:  # a 44.1 kHz stereo file: the CLI converts it
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(44100)
        mono = np.frombuffer(speech(44100, 1.0), dtype="<i2")
        out.writeframes(np.stack([mono, mono], axis=1).astype("<i2").tobytes())
    environ = {"GATEWAY_PUBLIC_URL": gateway.settings.public_url, "ULTRAVOX_API_KEY": "x",
               **call.double.environ("http://127.0.0.1:9")}
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    private = base64.b64encode(double("telnyx").signer.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())).decode()
    output = tmp_path / "agent.wav"
    code = cli_main([
        "simulate", "--carrier", carrier, "--to", BRIDGED_NUMBER, "--input", str(source), "--output", str(output),
        "--url", gateway.server.url, "--tail-seconds", "0.5", "--private-key", private,
    ])
    assert code == 0
    with wave.open(str(output)) as agent:
        assert agent.getframerate() == rate and agent.getnchannels() == 1
        heard = agent.readframes(agent.getnframes())
    # The fake Ultravox echoes the caller: the agent's recording is the caller's audio, resampled.
    assert len(heard) / 2 / rate > 0.9
    assert np.abs(np.frombuffer(heard, dtype="<i2")).mean() > 1000


@pytest.mark.parametrize("carrier", TRANSFER_CARRIERS)
def test_a_failed_transfer_in_bridge_mode_reconnects_the_stream_to_the_agent(bridged, fake_carriers, carrier):
    from .conftest import TOOL_SECRET

    call = bridged(carrier)
    fake, carrier_double = fake_carriers[carrier], call.double
    fake.live_calls.add(call.carrier_call_id)
    ultravox_call_id = call.ultravox.created_calls[-1]["callId"]
    reply = call.gateway.client.post("/tools/transfer", headers={"X-Gateway-Tool-Secret": TOOL_SECRET},
                                     json={"callId": ultravox_call_id, "operator": "sales", "reason": "pricing"})
    assert "Transferring" in reply.text
    assert wait_until(lambda: fake.updates)
    form = fake.form_for(call.carrier_call_id)
    no_answer = {**form, carrier_double.dial_status_param: "no-answer"}
    action = carrier_double.dialled(fake.callback(carrier_double.redirect_url(fake.updates[-1]), form).text).action
    action = carrier_double.dialled(fake.callback(action, no_answer).text).action
    answer = fake.callback(action, no_answer).text
    back, _ = carrier_double.connected_url(answer)
    assert set(media_credentials(carrier, back, carrier_double.stream_parameters(answer))) == {"call", "token"}
    returned = call.ultravox.requests[-1]
    assert returned.query["priorCallId"] == ultravox_call_id
    assert "serverWebSocket" in returned.body["medium"]


# --- review findings ---------------------------------------------------------------------------------


def test_twilio_streams_take_no_query_the_parameters_carry_the_call_and_its_token(bridged):
    """Twilio's <Stream url> supports no query string: the TwiML gives the call and its token as
    <Parameter>s, which the start message's customParameters bring, checked before anything
    reaches Ultravox (the upgrade's signature proves Twilio, but is the same for every call)."""
    call = bridged("twilio")
    assert "?" not in call.public_stream_url
    other = bridged("twilio")  # another call's valid credentials

    async def scenario(parameters):
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id, custom_parameters=parameters)
            await stream.play(speech(8000, 0.2))
            await asyncio.sleep(0.2)
            return len(stream.agent_audio()), stream.closed.is_set()

    for refused in ({"token": "1.forged"}, other.parameters, {"call": "", "token": ""}):
        assert asyncio.run(scenario(refused)) == (0, True)
    assert call.ultravox.sessions == {}  # refused before anything reached Ultravox
    heard, closed = asyncio.run(scenario({}))  # the TwiML's own parameters
    assert heard > 0 and not closed  # bridged: the echo came back


def test_frames_of_the_wrong_shape_are_skipped_too(bridged):
    call = bridged("telnyx")

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            session = await asyncio.to_thread(call.ultravox.wait_for_session)
            for bad in ({"event": "media", "media": "x"}, {"event": "dtmf", "dtmf": [1]}, {"event": "mark", "mark": 5}):
                await stream.send_raw(json.dumps(bad))
            await stream.play(speech(16000, 0.2))
            await asyncio.sleep(0.1)
            frames = session.frames_in
            await stream.stop()
            return frames

    assert asyncio.run(scenario()) == 10
    assert json.loads(wait_and_get_stats(call))["malformed"] == 3


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_the_call_is_completed_when_the_bridged_stream_ends(bridged, carrier):
    call = bridged(carrier)
    call.talk(0.1)
    assert wait_until(lambda: call.record().status == "completed")


def test_a_stream_that_never_starts_or_streams_another_format_fails_the_call(bridged, fake_carriers):
    call = bridged("plivo")
    fake_carriers["plivo"].live_calls.add(call.carrier_call_id)

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id,
                               extra={"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}})
            return await stream.wait_closed(timeout=5)

    asyncio.run(scenario())
    assert wait_until(lambda: call.record().status == "failed")
    assert "audio/x-mulaw" in call.record().failure_reason
    assert call.ultravox.sessions == {}  # nothing reached Ultravox


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_the_agents_goodbye_plays_before_the_call_is_hung_up(bridged, carrier):
    call = bridged(carrier)
    call.ultravox.media_mode = "silent"

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            session = await asyncio.to_thread(call.ultravox.wait_for_session)
            await asyncio.to_thread(session.send_audio, speech(call.rate, 0.5))
            await asyncio.to_thread(session.hang_up)
            await stream.wait_closed(timeout=5)
            marks = [stream.dialect.mark_name(mark.data) for mark in stream.of_kind("mark")]
            closed_at = time.monotonic()
            return marks, closed_at - stream.of_kind("audio")[0].at

    marks, open_for = asyncio.run(scenario())
    assert marks and marks[0] == "gateway-goodbye"
    assert open_for >= 0.45  # the half second of goodbye had time to play


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_an_outbound_call_on_a_bridged_route_is_bridged_too(bridged, fake_carriers, carrier):
    call = bridged(carrier)  # the route exists; this test places its own call on it
    gateway, fake, carrier_double = call.gateway, fake_carriers[carrier], call.double
    response = gateway.client.post("/v1/calls", headers={"Authorization": f"Bearer {API_KEY}"},
                                   json={"to": "+15557654321", "route": "bridged", "carrier": carrier})
    assert response.status_code == 201, response.text
    (placed,) = fake.calls
    picked_up = carrier_double.pick_up(fake, placed)
    stream_url = picked_up.stream_url
    assert set(media_credentials(carrier, stream_url, picked_up.stream_parameters)) == {"call", "token"}
    assert "serverWebSocket" in call.ultravox.requests[-1].body["medium"]

    async def scenario():
        headers = carrier_double.stream_headers(stream_url)
        async with CarrierStream(carrier, local(gateway, stream_url), headers=headers,
                                 parameters=picked_up.stream_parameters) as stream:
            await stream.start(call_id=fake.live_id(placed))
            await stream.play(speech(call.rate, 0.2))
            await asyncio.sleep(0.2)
            return stream.agent_audio()

    assert len(asyncio.run(scenario())) > 0  # the callee heard the (echoing) agent through the gateway


@pytest.mark.parametrize("carrier", ULTRAVOX_DIAL_CARRIERS)
def test_ultravox_cannot_dial_a_bridged_route(bridged, carrier):
    call = bridged(carrier)
    refused = call.gateway.client.post("/v1/calls", headers={"Authorization": f"Bearer {API_KEY}"},
                                       json={"to": "+15557654321", "route": "bridged", "carrier": carrier, "via": "ultravox"})
    assert refused.status_code == 422 and "bridge mode" in refused.text


def test_a_media_token_opens_one_socket_across_replicas(bridged, make_gateway, tmp_path):
    """Two gateways sharing one database: the token's use is recorded in the store, not in memory."""
    call = bridged("telnyx")
    gateway = call.gateway
    other = make_gateway(f"""
[[routes]]
number = "{BRIDGED_NUMBER}"
name = "bridged"
agent_id = "{AGENT_ID}"
mode = "bridge"
""", database_url=gateway.settings.database_url)

    async def first_use():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            await asyncio.to_thread(call.ultravox.wait_for_session)

    asyncio.run(first_use())
    here, there = gateway.server.url.replace("http", "ws"), other.server.url.replace("http", "ws")
    on_the_other_replica = call.local_url.replace(here, there)
    assert _refused(on_the_other_replica) == 403


def aligned_snr_db(sent: bytes, got: bytes, max_lag: int = 200) -> float:
    """snr_db of `got` against `sent` at the delay (in samples, either way) that suits it best:
    resampling filters delay the signal by a few samples."""
    def shifted(lag: int) -> tuple[bytes, bytes]:
        return (sent[: len(sent) - 2 * lag], got[2 * lag:]) if lag >= 0 else (sent[-2 * lag:], got)
    return max(snr_db(*shifted(lag)) for lag in range(-max_lag, max_lag + 1))


@pytest.mark.parametrize("codec", ["PCMU", "PCMA"])
def test_a_telnyx_stream_in_the_calls_own_g711_codec_is_transcoded_both_ways_never_hung_up(bridged, fake_carriers, codec):
    """Telnyx falls back to the call's codec (PCMU or PCMA, 8 kHz) when it cannot transcode to the
    L16 asked for: the bridge decodes and resamples it to the 16 kHz the Ultravox call was created
    with, and answers in that codec at 8 kHz; the call goes on and ends as any other."""
    from gateway.media.codecs import Resampler

    call = bridged("telnyx")
    fake_carriers["telnyx"].live_calls.add(call.carrier_call_id)
    assert call.ultravox_request.body["medium"]["serverWebSocket"]["inputSampleRate"] == 16000
    sent = speech(8000, 1.0)

    async def scenario():
        async with call.stream(codec=codec) as stream:
            await stream.start(call_id=call.carrier_call_id)
            await stream.play(sent)
            await asyncio.sleep(0.3)  # the echo of the last frames
            await stream.stop()
            return stream.agent_audio(), stream.format_errors

    back, errors = asyncio.run(scenario())
    assert errors == []  # the agent's audio came in whole 20 ms frames of the stream's own codec
    session = call.ultravox.sessions[call.ultravox.created_calls[-1]["callId"]]
    heard = bytes(session.audio_in)  # Ultravox heard 16 kHz PCM: twice the samples
    assert abs(len(heard) / 2 / 16000 - 1.0) < 0.05
    # G.711 and two resampling filters (whose delay need not be a whole 8 kHz sample) bound the
    # figure; garbled audio (no resampling, wrong codec) scores below 0 dB.
    assert aligned_snr_db(sent, Resampler(16000, 8000).convert(heard)) > 12
    assert abs(len(back) / 2 / 8000 - 1.0) < 0.05  # the caller hears its codec at 8 kHz again
    assert aligned_snr_db(sent, back) > 12
    assert wait_until(lambda: call.record().status == "completed")
    assert fake_carriers["telnyx"].updates == []  # never hung up


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_agent_audio_of_any_frame_size_reaches_the_carrier_in_sizes_it_accepts(bridged, carrier):
    """Ultravox's frames need not match the carrier's chunk rule (Exotel: multiples of 320 bytes):
    the bridge re-cuts them, holding a short rest back for the next frame, losing nothing."""
    call = bridged(carrier)
    call.ultravox.media_mode = "silent"
    agent = speech(call.rate, 0.5)

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            session = await asyncio.to_thread(call.ultravox.wait_for_session)
            for offset in range(0, len(agent), 500):  # 250 samples: no carrier's natural frame
                await asyncio.to_thread(session.send_audio, agent[offset:offset + 500])
            await asyncio.sleep(0.3)
            await stream.stop()
            return stream.agent_audio(), stream.format_errors

    heard, errors = asyncio.run(scenario())
    assert errors == []  # the stream dialect checks each chunk against the carrier's rule
    # Everything but (at most) a rest shorter than one frame arrived.
    frame = call.rate * CARRIERS[carrier].media_chunk_ms // 1000 * 2
    assert 0 <= len(agent) - len(heard) <= max(frame - 2, 0)
