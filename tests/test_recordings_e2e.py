"""Recordings end to end: listed when a stretch starts, downloaded through /v1, repaired after a
process is killed mid-call, and deleted after their route's retention_days."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.media.recording import STALE_SECONDS, read_layout
from gateway.store import CallStore
from gateway.testing import CarrierStream, GatewayProcess, double

from .conftest import AGENT_ID, API_KEY, BASE_CONFIG, PUBLIC_URL, TOOL_SECRET, gateway_environ, stored_calls
from .test_bridge import BRIDGED_NUMBER, BridgedCall, local, speech, wait_until

AUTH = {"Authorization": f"Bearer {API_KEY}"}
HEADER_BYTES = 44


def bridged_route(recording_dir: Path, extra: str = "") -> str:
    return f"""
[[routes]]
number = "{BRIDGED_NUMBER}"
name = "bridged"
agent_id = "{AGENT_ID}"
mode = "bridge"
recording_dir = "{recording_dir}"
operators = ["sales"]
{extra}"""


@pytest.fixture
def bridged(make_gateway, fake_ultravox, tmp_path):
    gateway = make_gateway(bridged_route(tmp_path / "recordings"))
    return lambda carrier: BridgedCall(gateway, fake_ultravox, carrier)


def wav_frames(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data)) as recording:
        assert (recording.getnchannels(), recording.getsampwidth()) == (2, 2)
        return np.frombuffer(recording.readframes(recording.getnframes()), dtype="<i2").reshape(-1, 2)


def frames_on_disk(path: str | Path) -> int:
    try:
        return max(os.path.getsize(path) - HEADER_BYTES, 0) // 4
    except FileNotFoundError:
        return 0


def add_recording(database_url: str, call_id: str, path: str) -> None:
    async def add():
        store = CallStore.open(database_url)
        try:
            await store.add_recording(call_id, path)
        finally:
            await store.close()

    asyncio.run(add())


def test_a_recording_is_listed_when_it_starts_and_downloadable_during_and_after_the_call(bridged):
    call = bridged("twilio")
    sent = speech(call.rate, 2.5)

    async def scenario():
        async with call.stream() as stream:
            await stream.start(call_id=call.carrier_call_id)
            playing = asyncio.create_task(stream.play(sent))
            # Listed on the call, and on disk, while the call goes on.
            assert await asyncio.to_thread(wait_until, lambda: call.record().recording_path is not None)
            path = (await asyncio.to_thread(call.record)).recording_path
            assert await asyncio.to_thread(wait_until, lambda: frames_on_disk(path) >= call.rate)
            call_id = (await asyncio.to_thread(call.record)).id
            during = await asyncio.to_thread(call.gateway.client.get, f"/v1/calls/{call_id}/recording", headers=AUTH)
            await playing
            await stream.stop()
            return during

    during = asyncio.run(scenario())
    # A snapshot of a recording still being written: a valid WAV, its Content-Length kept.
    assert during.status_code == 200 and during.headers["content-type"] == "audio/wav"
    assert int(during.headers["content-length"]) == len(during.content)
    assert len(wav_frames(during.content)) >= call.rate
    assert wait_until(lambda: call.record().status == "completed")
    record = call.record()
    view = call.gateway.client.get(f"/v1/calls/{record.id}", headers=AUTH).json()
    assert view["recording_url"] == f"/v1/calls/{record.id}/recording" and view["recording_parts"] == 1
    after = call.gateway.client.get(view["recording_url"], headers=AUTH)
    assert after.status_code == 200 and after.headers["recording-parts"] == "1"
    assert after.content == Path(record.recording_path).read_bytes()
    assert 'filename="' in after.headers["content-disposition"]
    audio = wav_frames(after.content)
    assert len(audio) >= len(sent) // 2  # the whole call, at least what the caller said
    assert np.abs(audio[:, 0].astype(float)).mean() > 1000  # the caller, left


def test_recording_download_refusals(bridged, tmp_path):
    call = bridged("plivo")
    call.talk(0.2)
    assert wait_until(lambda: call.record().status == "completed")
    client, call_id = call.gateway.client, call.record().id
    url = f"/v1/calls/{call_id}/recording"
    assert client.get(url).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer not-a-key-of-ours-at-all"}).status_code == 401
    assert client.get("/v1/calls/no-such-call/recording", headers=AUTH).status_code == 404
    for bad in ("-1", "x", "1.5", "", "²"):
        assert client.get(url, params={"part": bad}, headers=AUTH).status_code == 400, bad
    beyond = client.get(url, params={"part": "1"}, headers=AUTH)
    assert beyond.status_code == 404 and beyond.headers["recording-parts"] == "1"
    # A call without a recording: a direct-mode call on another route.
    other = double("twilio")
    assert call.gateway.post("twilio", other.inbound_form(to="+15550001111")).status_code == 200
    plain = [r for r in call.gateway.records() if r.route == "support"][0]
    assert client.get(f"/v1/calls/{plain.id}/recording", headers=AUTH).status_code == 404
    # A path outside the recording directories is never served, even though it is on the record.
    outside = tmp_path / "elsewhere" / f"{call_id}-1.wav"
    outside.parent.mkdir()
    outside.write_bytes(Path(call.record().recording_path).read_bytes())
    add_recording(call.gateway.settings.database_url, call_id, str(outside))
    assert client.get(url, params={"part": "1"}, headers=AUTH).status_code == 404
    # And a recording deleted by hand is gone, not an error.
    Path(call.record().recordings[0]).unlink()
    assert client.get(url, headers=AUTH).status_code == 404
    assert "/v1/calls/{call_id}/recording" in client.get("/v1/openapi.json").json()["paths"]


def test_a_call_back_from_a_transfer_has_a_second_recording(bridged, fake_carriers):
    carrier = "twilio"
    call = bridged(carrier)
    fake, carrier_double = fake_carriers[carrier], call.double
    fake.live_calls.add(call.carrier_call_id)

    def transfer():
        ultravox_call_id = call.ultravox.created_calls[-1]["callId"]
        reply = call.gateway.client.post("/tools/transfer", headers={"X-Gateway-Tool-Secret": TOOL_SECRET},
                                         json={"callId": ultravox_call_id, "operator": "sales", "reason": "pricing"})
        assert "Transferring" in reply.text
        assert wait_until(lambda: any(carrier_double.redirect_url(update) for update in fake.updates))
        return next(url for url in map(carrier_double.redirect_url, fake.updates) if url)

    async def stretch(url, public_url, parameters, then=None):
        async with CarrierStream(carrier, url, headers=carrier_double.stream_headers(public_url),
                                 parameters=parameters) as stream:
            await stream.start(call_id=call.carrier_call_id)
            await stream.play(speech(call.rate, 0.3))
            # The agent hands the caller over while they talk; the carrier then ends the stream.
            result = await asyncio.to_thread(then) if then else None
            await stream.stop()
            return result

    redirect = asyncio.run(stretch(call.local_url, call.public_stream_url, call.parameters, then=transfer))
    form = fake.form_for(call.carrier_call_id)
    no_answer = {**form, carrier_double.dial_status_param: "no-answer"}
    action = carrier_double.dialled(fake.callback(redirect, form).text).action
    action = carrier_double.dialled(fake.callback(action, no_answer).text).action
    # A media token is the call and its expiry second: one issued within the second of the first
    # would be the first (already used). A real transfer takes longer than that.
    started = int(time.time())
    while int(time.time()) == started:
        time.sleep(0.05)
    returned = fake.callback(action, no_answer).text
    back, _ = carrier_double.connected_url(returned)
    assert wait_until(lambda: len(call.record().recordings) == 1 and call.record().media_stats is not None)
    asyncio.run(stretch(local(call.gateway, back), back, carrier_double.stream_parameters(returned)))
    assert len(call.record().recordings) == 2  # listed when the stretch started
    assert wait_until(lambda: call.record().status == "completed")  # and the stretch is over: written
    url = f"/v1/calls/{call.record().id}/recording"
    first, second = (call.gateway.client.get(url, params={"part": n}, headers=AUTH) for n in (0, 1))
    assert first.headers["recording-parts"] == second.headers["recording-parts"] == "2"
    assert first.content == Path(call.record().recordings[0]).read_bytes()
    assert second.content == Path(call.record().recordings[1]).read_bytes()
    assert call.gateway.client.get(url, headers=AUTH).content == first.content  # the first by default


def test_a_recording_survives_its_process_being_killed_mid_call(make_gateway, fake_ultravox, fake_carriers, tmp_path):
    """A real `gateway serve` is SIGKILLed in the middle of a bridged call; the file it was writing is
    findable from the call, and a gateway starting later leaves it a valid WAV of what was said."""
    recordings = tmp_path / "recordings"
    config = tmp_path / "killed.toml"
    config.write_text(BASE_CONFIG + bridged_route(recordings))
    database_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    environ = gateway_environ(fake_ultravox, database_url, fake_carriers)
    # On port 0: the port it bound is read from its log (none picked free here that another could take).
    with GatewayProcess(config, environ, work_dir=tmp_path, name="killed") as server:
        server.start().wait_ready()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            carrier = double("twilio")
            form = carrier.inbound_form(to=BRIDGED_NUMBER)
            request = carrier.inbound_request(PUBLIC_URL, "/twilio/inbound", form)
            answer = client.request(request.method, "/twilio/inbound", content=request.body, headers=request.headers)
            assert answer.status_code == 200, answer.text
        public_stream_url, _ = carrier.connected_url(answer.text)
        stream_url = public_stream_url.replace("wss://gateway.example.test", server.url.replace("http", "ws"))
        sent = speech(8000, 4.0)

        def the_record():
            (record,) = [r for r in stored_calls(database_url) if r.carrier_call_id == form[carrier.call_id_param]]
            return record

        async def call_then_kill():
            async with CarrierStream("twilio", stream_url, headers=carrier.stream_headers(public_stream_url),
                                     parameters=carrier.stream_parameters(answer.text)) as stream:
                await stream.start(call_id=form[carrier.call_id_param])
                playing = asyncio.create_task(stream.play(sent))
                # Listed on the call as soon as the stretch starts, not only at its end.
                assert await asyncio.to_thread(wait_until, lambda: the_record().recording_path is not None)
                path = (await asyncio.to_thread(the_record)).recording_path
                assert await asyncio.to_thread(wait_until, lambda: frames_on_disk(path) >= 8000 * 1.5)
                server.kill()
                assert server.wait(timeout=10) == -signal.SIGKILL
                playing.cancel()
                return path

        path = Path(asyncio.run(call_then_kill()))
    killed_at_frames = frames_on_disk(path)
    assert the_record().status != "completed"  # nobody ended the call: its process died
    # Each write patches the header, so even as the kill left it the file is a WAV of what was
    # written before the last write (all of it, unless the kill landed inside that write).
    with wave.open(str(path)) as as_left:
        assert as_left.getnframes() >= 8000 * 1.5
    # Had the kill landed inside a write, the file would hold audio the header does not count,
    # ending in a cut frame; make it so (the moment cannot be aimed at from outside).
    with open(path, "ab") as file:
        file.write(np.full((200, 2), 7, dtype="<i2").tobytes() + b"\x07")
    assert not read_layout(path).consistent
    then = time.time() - STALE_SECONDS - 5  # no writer has touched it for longer than a live one would
    os.utime(path, (then, then))
    # A fresh file of a call that may still be going on (another replica's) is left alone.
    live = recordings / f"{the_record().id}-{int(time.time() * 1000)}.wav"
    live.write_bytes(path.read_bytes()[: HEADER_BYTES + 4000] + b"\x01")

    make_gateway(bridged_route(recordings), database_url=database_url)
    assert wait_until(lambda: read_layout(path).consistent, timeout=10)
    with wave.open(str(path)) as repaired:
        assert repaired.getframerate() == 8000
        audio = np.frombuffer(repaired.readframes(repaired.getnframes()), dtype="<i2").reshape(-1, 2)
    assert len(audio) == killed_at_frames + 200
    caller = audio[: killed_at_frames, 0].astype(float)
    # What the caller said before the kill is there: speech in the left channel up to near the end.
    assert np.abs(caller[-8000:]).mean() > 1000
    assert not read_layout(live).consistent


def test_recordings_past_their_routes_retention_are_deleted_and_taken_off_their_calls(bridged, make_gateway, tmp_path):
    call = bridged("telnyx")
    call.talk(0.2)
    assert wait_until(lambda: call.record().status == "completed")
    old = Path(call.record().recording_path)
    young = old.with_name(f"{call.record().id}-{int(time.time() * 1000) + 1}.wav")
    young.write_bytes(old.read_bytes())
    add_recording(call.gateway.settings.database_url, call.record().id, str(young))
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    # The gateway sweeps at start (and hourly): one with a retention of a day on the route.
    make_gateway(bridged_route(old.parent, "retention_days = 1"), database_url=call.gateway.settings.database_url)
    assert wait_until(lambda: not old.exists())
    assert wait_until(lambda: call.record().recordings == [str(young)])
    assert young.exists()
    view = call.gateway.client.get(f"/v1/calls/{call.record().id}", headers=AUTH).json()
    assert view["recording_parts"] == 1


def test_retention_days_needs_a_recording_dir(make_gateway):
    from gateway.settings import ConfigError

    with pytest.raises(ConfigError, match="retention_days needs recording_dir"):
        make_gateway(f"""
[[routes]]
number = "{BRIDGED_NUMBER}"
agent_id = "{AGENT_ID}"
retention_days = 3
""")
