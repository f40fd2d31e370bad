"""Tests of the carrier media-stream simulator and of FakeUltravox's serverWebSocket side."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from twilio.request_validator import RequestValidator
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from gateway.carriers import CARRIERS
from gateway.carriers.base import MalformedFrame, StreamAudio, StreamMark, StreamStart, StreamStop
from gateway.settings import load_settings
from gateway.testing import CarrierStream, FakeUltravox, ServerThread, double, twilio_stream_headers

from .conftest import CARRIER_NAMES

KEY = {"X-API-Key": "test-ultravox-key"}


# -- a loopback "gateway" that plays back what the carrier sends -------------


class Relay:
    """Answers each carrier ``media`` with that carrier's outbound audio message.

    It speaks the gateway's side of each carrier's media protocol through the carrier's own
    `gateway.carriers` class, so that every registered carrier is covered and the simulator's
    dialect (written from the carrier's documentation) is checked against it.
    """

    def __init__(self) -> None:
        self.log: list[tuple[str, dict]] = []  # (carrier, JSON message received)
        self.events: list[tuple[str, object]] = []  # (carrier, the message as the gateway reads it)
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        settings = load_settings(None, {})
        self.carriers = {name: carrier(settings) for name, carrier in CARRIERS.items()}
        self.app = Starlette(routes=[WebSocketRoute("/media/{carrier}", self.handle)])

    def forget(self) -> None:
        """Start the logs afresh: the relay is shared by the module's tests, which run in any order."""
        with self.lock:
            self.log.clear()
            self.events.clear()
            self.headers.clear()

    def messages(self, carrier: str, event: str | None = None) -> list[dict]:
        with self.lock:
            return [m for c, m in self.log if c == carrier and (event is None or m.get("event") == event)]

    def read(self, carrier: str, kind: type) -> list:
        """What the relay received from ``carrier``, as the gateway's events of ``kind``."""
        with self.lock:
            return [e for c, e in self.events if c == carrier and isinstance(e, kind)]

    async def handle(self, websocket: WebSocket) -> None:
        name = websocket.path_params["carrier"]
        carrier = self.carriers[name]
        await websocket.accept()
        self.headers.append(dict(websocket.headers))
        stream_id = None
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text") or ""
            if text == "clear-me":
                await websocket.send_text(carrier.media_clear(stream_id))
                continue
            if text.startswith("mark-me:"):
                await websocket.send_text(carrier.media_mark(stream_id, text[8:]))
                continue
            if text.startswith("send:"):  # send this frame back verbatim
                await websocket.send_text(text[5:])
                continue
            if text == "close-me":
                await websocket.close(4000)
                return
            try:
                event = carrier.parse_media(text)
            except MalformedFrame as error:  # another carrier's dialect, in a format-error test
                event = error
            with self.lock:
                self.log.append((name, json.loads(text)))
                self.events.append((name, event))
            if isinstance(event, StreamStart):
                stream_id = event.stream_id
            elif isinstance(event, StreamAudio):
                await websocket.send_text(carrier.media_audio(stream_id, event.payload))


@pytest.fixture(scope="module")
def relay():
    relay = Relay()
    with ServerThread(relay.app) as server:
        relay.url = f"ws://127.0.0.1:{server.port}"
        yield relay


def sine(rate: int, seconds: float, freq: float = 440.0, amplitude: float = 8000.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def snr_db(reference: bytes, decoded: bytes) -> float:
    ref = np.frombuffer(reference, dtype="<i2").astype(np.float64)
    out = np.frombuffer(decoded, dtype="<i2").astype(np.float64)
    noise = ref - out
    return 10 * np.log10(np.sum(ref**2) / max(np.sum(noise**2), 1e-9))


async def until(predicate, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# -- CarrierStream ----------------------------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_carrier_stream_round_trip(relay, carrier):
    relay.forget()  # what this test's stream sent, only (another test's marks and starts came before it)

    async def main() -> None:
        rate = CARRIERS[carrier].media_rate  # the rate the gateway asks the carrier to stream at
        pcm = sine(rate, 0.2)
        # A query where the carrier's stream URLs take one (the rest get stream parameters only).
        url = f"{relay.url}/media/{carrier}" + ("?token=t1" if double(carrier).stream_url_takes_query else "")
        async with CarrierStream(carrier, url, headers={"X-Test": carrier}, playback="instant") as stream:
            assert stream.rate == rate == double(carrier).stream_rate
            await stream.start(call_id=f"call-{carrier}", custom_parameters={"token": "abc"})
            started = time.monotonic()
            assert await stream.play(pcm) == 10
            assert time.monotonic() - started >= 0.17  # paced: frame 9 leaves at t0 + 180 ms
            await stream.wait_for("audio", count=10)
            await stream.send_dtmf("5")
            await stream.send_raw("clear-me")
            (clear,) = await stream.wait_for("clear")
            await stream.send_raw("mark-me:m1")
            await stream.wait_for("mark")
            await until(lambda: relay.read(carrier, StreamMark))
            await stream.stop()
            await until(lambda: relay.read(carrier, StreamStop))

            decoded = stream.agent_audio()
            assert len(decoded) == len(pcm)
            if stream.dialect.lossless:
                assert decoded == pcm
            else:
                assert snr_db(pcm, decoded) > 30
            assert stream.format_errors == []
            acks = [m for m in stream.sent if m.get("event") == stream.dialect.mark_ack_event]
            assert len(acks) == 1 and stream.acknowledged == ["m1"]
            assert [mark.name for mark in relay.read(carrier, StreamMark)] == ["m1"]  # as the gateway reads it
            await stream.send_raw("close-me")
            assert await stream.wait_closed() == 4000

        assert relay.headers[-1]["x-test"] == carrier
        assert [start.stream_id for start in relay.read(carrier, StreamStart)] == [stream.stream_id]
        check_shapes(carrier, relay.messages(carrier), stream)

    asyncio.run(main())


def check_shapes(carrier: str, messages: list[dict], stream: CarrierStream) -> None:
    """What every stream sends, then each carrier's own wire details, as its documentation has them."""
    events = [m["event"] for m in messages]
    media = [m for m in messages if m["event"] == "media"]
    dtmf = next(m for m in messages if m["event"] == "dtmf")
    start = next(m for m in messages if m["event"] == "start")
    stop = next(m for m in messages if m["event"] == "stop")
    assert len(media) == 10
    (ack,) = [m for m in messages if m["event"] == stream.dialect.mark_ack_event]
    if carrier == "twilio":
        assert ack["mark"] == {"name": "m1"} and ack["streamSid"] == stream.stream_id
    elif carrier == "telnyx":
        assert ack["mark"] == {"name": "m1"} and ack["stream_id"] == stream.stream_id
    elif carrier == "plivo":
        assert ack["event"] == "playedStream" and ack["name"] == "m1"
        assert ack["streamId"] == stream.stream_id
    if carrier == "twilio":
        assert events[:2] == ["connected", "start"]
        assert messages[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        body = start["start"]
        assert start["sequenceNumber"] == "1" and start["streamSid"] == body["streamSid"]
        assert body["streamSid"].startswith("MZ") and body["accountSid"].startswith("AC")
        assert body["callSid"] == "call-twilio" and body["tracks"] == ["inbound"]
        assert body["customParameters"] == {"token": "abc"}
        assert body["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        assert [m["sequenceNumber"] for m in media] == [str(n) for n in range(2, 12)]
        assert [m["media"]["chunk"] for m in media] == [str(n) for n in range(1, 11)]
        assert [m["media"]["timestamp"] for m in media] == [str(20 * n) for n in range(10)]
        assert all(m["streamSid"] == stream.stream_id and m["media"]["track"] == "inbound" for m in media)
        assert len(media[0]["media"]["payload"]) == 216  # base64 of 160 mu-law bytes
        assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "5"}
        assert stop["stop"] == {"accountSid": stream.account_id, "callSid": "call-twilio"}
        assert stop["streamSid"] == stream.stream_id
    elif carrier == "telnyx":
        assert events[:2] == ["connected", "start"]
        body = start["start"]
        assert start["stream_id"] == stream.stream_id and start["sequence_number"] == "1"
        assert body["call_control_id"] == "call-telnyx"
        assert body["media_format"] == {"encoding": "L16", "sample_rate": 16000, "channels": 1}
        assert [m["sequence_number"] for m in media] == [str(n) for n in range(2, 12)]
        assert [m["media"]["chunk"] for m in media] == [str(n) for n in range(1, 11)]
        assert [m["media"]["timestamp"] for m in media] == [str(20 * n) for n in range(10)]
        raw = base64.b64decode(media[0]["media"]["payload"])
        first = np.frombuffer(sine(16000, 0.02), dtype="<i2")
        assert np.array_equal(np.frombuffer(raw, dtype=">i2"), first)  # big-endian L16
        assert dtmf["dtmf"] == {"digit": "5"} and dtmf["stream_id"] == stream.stream_id
        assert stop["stream_id"] == stream.stream_id
    elif carrier == "plivo":
        assert events[0] == "start"
        body = start["start"]
        assert start["sequenceNumber"] == 1
        assert body["callId"] == "call-plivo" and body["streamId"] == stream.stream_id
        assert body["accountId"] == stream.account_id and body["tracks"] == ["inbound"]
        assert body["mediaFormat"] == {"encoding": "audio/x-l16", "sampleRate": 16000}
        assert body["customParameters"] == {"token": "abc"}
        assert [m["sequenceNumber"] for m in media] == list(range(2, 12))
        assert [m["media"]["chunk"] for m in media] == list(range(1, 11))
        now_ms = time.time() * 1000
        assert all(abs(int(m["media"]["timestamp"]) - now_ms) < 60_000 for m in media)  # Unix ms
        raw = base64.b64decode(media[0]["media"]["payload"])
        assert raw == sine(16000, 0.2)[:640]  # little-endian L16
        assert dtmf["dtmf"]["digit"] == "5" and dtmf["streamId"] == stream.stream_id
        assert stop["streamId"] == stream.stream_id


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_marks_wait_for_playback_and_clear_flushes_them(relay, carrier):
    async def main() -> None:
        async with CarrierStream(carrier, f"{relay.url}/media/{carrier}") as stream:
            dialect = stream.dialect

            def acks() -> list[dict]:
                return [m for m in stream.sent if m["event"] == dialect.mark_ack_event]

            await stream.start(call_id="c1")
            # One second of agent audio arrives at once, so it is still "playing".
            await stream.play(bytes(stream.rate * 2), realtime=False)
            await stream.wait_for("audio", count=50)
            await stream.send_raw("mark-me:pending")
            await stream.wait_for("mark")
            await asyncio.sleep(0.05)
            assert not acks()
            started = time.monotonic()
            await stream.send_raw("clear-me")
            await stream.wait_for("clear")
            if dialect.clear_acks_marks:  # the clear returns the pending mark…
                await until(acks)
                assert [dialect.mark_name(ack) for ack in acks()] == ["pending"]
            else:  # …or is answered itself, and the cleared mark never is
                await until(lambda: any(m["event"] == dialect.clear_ack_event for m in stream.sent))
                assert not acks()
            assert time.monotonic() - started < 0.5
            # After the clear nothing is queued: the next mark comes back at once.
            await stream.send_raw("mark-me:after")
            await until(lambda: any(dialect.mark_name(ack) == "after" for ack in acks()), timeout=0.5)

    asyncio.run(main())


def test_format_errors_and_malformed_frames(relay):
    async def main() -> None:
        async with CarrierStream("twilio", f"{relay.url}/media/twilio", playback="instant") as stream:
            await stream.start(call_id="c2")
            await stream.send_raw("mark-me:x")
            await stream.wait_for("mark")
            assert stream.format_errors == []
        # A relay speaking Telnyx to a Twilio stream: Twilio's mark must name its streamSid.
        async with CarrierStream("twilio", f"{relay.url}/media/telnyx") as stream:
            await stream.start(call_id="c3")
            await stream.send_raw("mark-me:y")
            await stream.wait_for("mark")
            assert any("streamSid" in error for error in stream.format_errors)
        # Plivo: agent audio in another format than the stream's is decoded, resampled and flagged.
        async with CarrierStream("plivo", f"{relay.url}/media/plivo") as stream:
            await stream.start(call_id="c4")
            payload = base64.b64encode(sine(8000, 0.02)).decode()
            media = {"contentType": "audio/x-l16", "sampleRate": 8000, "payload": payload}
            play = {"event": "playAudio", "media": media}
            await stream.send_raw("send:" + json.dumps(play))
            await stream.send_raw("send:not json")
            await stream.wait_for("other")
            assert len(stream.of_kind("audio")) == 1
            assert abs(len(stream.agent_audio()) - 640) <= 4  # 20 ms at 16 kHz
            assert len(stream.format_errors) == 2
            assert "differs" in stream.format_errors[0] and "JSON" in stream.format_errors[1]
        with pytest.raises(ValueError):
            CarrierStream("vonage", "ws://127.0.0.1:1/")

    asyncio.run(main())


def test_twilio_stream_headers_validate():
    url = "wss://gateway.example.test/media/twilio?token=a&b=c"
    headers = twilio_stream_headers("secret-token", url)
    assert RequestValidator("secret-token").validate(url, {}, headers["X-Twilio-Signature"])
    assert not RequestValidator("other").validate(url, {}, headers["X-Twilio-Signature"])


# -- FakeUltravox: serverWebSocket ------------------------------------------


@pytest.fixture(scope="module")
def ultravox():
    fake = FakeUltravox()
    with fake.serve() as server:
        yield fake, server


@pytest.fixture
def fake(ultravox):
    fake, _ = ultravox
    fake.reset()
    yield fake
    fake.reset()


def create_socket_call(server, medium: dict) -> httpx.Response:
    body = {"systemPrompt": "You are a receptionist.", "medium": {"serverWebSocket": medium}}
    return httpx.post(server.url + "/api/calls", json=body, headers=KEY, timeout=5.0)


def test_fake_ultravox_server_websocket(ultravox, fake):
    _, server = ultravox
    response = create_socket_call(server, {"inputSampleRate": 8000, "outputSampleRate": 8000})
    assert response.status_code == 201, response.text
    call = response.json()
    call_id = call["callId"]
    assert call["joinUrl"] == f"ws://127.0.0.1:{server.port}/calls/{call_id}/server?apiVersion=1"
    assert fake.schema_errors == []

    with sync_connect(call["joinUrl"]) as ws:
        session = fake.wait_for_session(call_id)
        assert session.connected.wait(2)
        assert session.query == {"apiVersion": "1"}
        frame = bytes(range(256)) * 1 + bytes(64)
        ws.send(frame)
        assert ws.recv(timeout=2) == frame  # echo
        ws.send(json.dumps({"type": "ping", "timestamp": 1.5}))
        assert json.loads(ws.recv(timeout=2)) == {"type": "pong", "timestamp": 1.5}
        assert session.frames_in == 1 and bytes(session.audio_in) == frame
        assert session.messages_in == [{"type": "ping", "timestamp": 1.5}]

        session.send_json({"type": "playback_clear_buffer"})
        assert json.loads(ws.recv(timeout=2)) == {"type": "playback_clear_buffer"}
        session.send_audio(b"\x01\x02" * 160)
        assert ws.recv(timeout=2) == b"\x01\x02" * 160

        fake.media_mode = "silent"
        ws.send(b"\x00\x00" * 160)
        assert session.wait_for_audio(len(frame) + 320)
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.1)

        # Join URLs are single-use.
        with sync_connect(call["joinUrl"]) as second:
            with pytest.raises(ConnectionClosed) as closed:
                second.recv(timeout=2)
        assert closed.value.rcvd.code == 4409

        session.hang_up()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=2)
        assert closed.value.rcvd.code == 1000
    assert session.closed.is_set() and session.close_code == 1000
    with pytest.raises(ConnectionError):
        session.send_json({"type": "playback_clear_buffer"})


def test_fake_ultravox_greeting_and_client_close(ultravox, fake):
    _, server = ultravox
    fake.greeting = bytes(range(256)) * 25  # 200 ms at 16 kHz
    call = create_socket_call(server, {"inputSampleRate": 16000}).json()
    received = b""
    with sync_connect(call["joinUrl"]) as ws:
        started = time.monotonic()
        while len(received) < len(fake.greeting):
            chunk = ws.recv(timeout=2)
            assert len(chunk) == 640  # 20 ms at 16 kHz
            received += chunk
        elapsed = time.monotonic() - started
        ws.send(json.dumps({"type": "client_tool_result", "invocationId": "i1", "result": "ok"}))
        session = fake.wait_for_session(call["callId"])
        (result,) = session.wait_for_message("client_tool_result")
        assert result["invocationId"] == "i1"
    assert received == fake.greeting
    assert 0.15 <= elapsed < 1.0  # paced in real time: the last frame leaves at 180 ms
    assert session.closed.wait(2) and session.close_code == 1000


def test_fake_ultravox_rejects_bad_server_websocket_medium(ultravox, fake):
    _, server = ultravox
    for medium in ({}, {"inputSampleRate": "16000"}, {"inputSampleRate": 16000, "clientBufferSizeMs": 1.5}):
        response = create_socket_call(server, medium)
        assert response.status_code == 400, medium
    assert fake.calls_created == 0
    # Other mediums keep the telephony join URL.
    response = httpx.post(
        server.url + "/api/calls",
        json={"systemPrompt": "x", "medium": {"twilio": {}}},
        headers=KEY,
    )
    assert response.json()["joinUrl"].startswith("wss://voice.fake-ultravox.test/")
    with sync_connect(f"ws://127.0.0.1:{server.port}/calls/{response.json()['callId']}/server") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=2)
    assert closed.value.rcvd.code == 4404


def test_fake_ultravox_converses_greets_then_answers_each_utterance(ultravox, fake):
    """The stand-in agent (`converse`): its greeting at the session's rate, then its answer once the
    caller has said something and paused; silence and a click get no answer. By default it speaks
    the WAVs shipped with the package."""
    from gateway.testing import Speech

    assert fake.converse().greeting == Speech.shipped("greeting") and fake.answer == Speech.shipped("answer")
    assert 1.0 < fake.greeting.seconds < 4.0 and 1.0 < fake.answer.seconds < 8.0 and fake.greeting.rate == 8000
    _, server = ultravox
    greeting, answer = Speech(sine(8000, 0.2, freq=200), 8000), Speech(sine(8000, 0.3, freq=250), 8000)
    fake.converse(greeting, answer)
    call = create_socket_call(server, {"inputSampleRate": 16000, "outputSampleRate": 16000}).json()
    received = bytearray()

    def receive_until_quiet(ws, quiet: float) -> None:
        while True:
            try:
                received.extend(ws.recv(timeout=quiet))
            except TimeoutError:
                return

    with sync_connect(call["joinUrl"]) as ws:
        session = fake.wait_for_session(call["callId"])
        receive_until_quiet(ws, 0.3)  # the greeting, resampled to 16 kHz
        assert abs(len(received) - len(greeting.at(16000))) <= 640
        heard = len(received)
        ws.send(bytes(640) * 10)  # silence
        ws.send(sine(16000, 0.02))  # a click: too short to be speech
        time.sleep(0.8)
        assert session.utterances == 0 and len(received) == heard
        caller = sine(16000, 0.4, freq=300)
        for offset in range(0, len(caller), 640):
            ws.send(caller[offset:offset + 640])
        receive_until_quiet(ws, 1.0)  # the pause ends the utterance, then the answer comes
        assert session.utterances == 1
        assert abs(len(received) - heard - len(answer.at(16000))) <= 640
    assert session.closed.wait(2)


def test_an_utterance_ends_after_its_pause_in_audio_or_in_time_whatever_the_pace():
    """`Utterances` (the stand-in agent's ears): a pause is the silence the caller sent, however fast
    it was sent, plus the time since anything came; frames held up on the way are no pause."""
    from gateway.testing import Utterances

    frame_ms, silent = 20, bytes(320)
    voiced = [sine(8000, 0.02, freq=300)] * 20  # 0.4 s of speech, as 20 ms frames

    def played(pace: float, frames: list[bytes], ears: Utterances, start: float) -> float:
        now = start
        for frame in frames:
            ears.hear(frame, now)
            now += frame_ms / 1000 / pace
        return now

    for pace in (1, 4, 16):  # speech, then 0.6 s of silence sent at that pace: the utterance is over
        ears = Utterances(8000)
        now = played(pace, voiced, ears, 0.0)
        now = played(pace, [silent] * 28, ears, now)
        assert not ears.finished(now), pace  # 0.56 s of pause sent so far
        now = played(pace, [silent] * 2, ears, now)
        assert ears.finished(now) and not ears.finished(now), pace  # once
    # A caller who stops sending has paused as long as nothing came.
    ears = Utterances(8000)
    now = played(1, voiced, ears, 0.0)
    assert not ears.finished(now + 0.5) and ears.finished(now + 0.61)
    # Speech held up on the way for 0.3 s, then the rest of it: one utterance still under way.
    ears = Utterances(8000)
    now = played(4, voiced[:10], ears, 0.0)
    assert not ears.finished(now + 0.3)
    now = played(4, voiced[10:], ears, now + 0.3)
    assert not ears.finished(now)
