"""CallRecorder streamed to disk, the repair of what a crash leaves, and the retention sweep, on a
clock of their own (the end-to-end recordings are in test_recordings_e2e.py)."""

from __future__ import annotations

import asyncio
import os
import struct
import time
import wave
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from gateway.media.recording import (
    FLUSH_SECONDS,
    MAX_AHEAD_SECONDS,
    SETTLE_SECONDS,
    STALE_SECONDS,
    CallRecorder,
    RecordingDir,
    RecordingUpkeep,
    read_layout,
    recording_dirs,
    repair_wav,
    snapshot,
)

RATE = 8000
FRAME = 160  # 20 ms


class SampleClock:
    """A clock the test moves by whole samples. (Half a sample in, so that the recorder's
    seconds × rate rounds down to the sample meant, never to the one before.)"""

    def __init__(self) -> None:
        self.at = 0.0

    def __call__(self) -> float:
        return self.at

    def to(self, sample: int) -> None:
        self.at = (sample + 0.5) / RATE


class Inline(Executor):
    """Writes at once, on the caller's thread: the file then says exactly what was handed over."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def frame(value: int) -> bytes:
    return np.full(FRAME, value, dtype="<i2").tobytes()


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as recording:
        assert (recording.getnchannels(), recording.getsampwidth(), recording.getframerate()) == (2, 2, RATE)
        return np.frombuffer(recording.readframes(recording.getnframes()), dtype="<i2").reshape(-1, 2)


def recorder(tmp_path: Path, clock: SampleClock, name: str = "call-1-1700000000000.wav") -> CallRecorder:
    return CallRecorder(tmp_path / name, RATE, clock, writer=Inline())


def test_the_caller_is_left_the_agent_right_and_a_clear_drops_what_was_not_heard(tmp_path):
    clock = SampleClock()
    rec = recorder(tmp_path, clock)
    for k in range(200):  # 4 s of caller frames, each arriving as it ends; value k + 1
        clock.to((k + 1) * FRAME)
        rec.caller(frame(k + 1))
        if k == 49:  # at 1 s the agent sends 2 s of audio at once: heard from now on, one after another
            for _ in range(100):
                rec.agent(frame(-7))
            assert rec.agent_queued_seconds == pytest.approx(2.0)
        if k == 99:  # at 2 s the caller barges in: the second of agent audio still queued is dropped
            rec.clear()
    rec.close()
    audio = read_wav(rec.path)
    assert len(audio) == 200 * FRAME
    caller, agent = audio[:, 0], audio[:, 1]
    assert (caller == np.repeat(np.arange(1, 201), FRAME)).all()
    assert (agent[RATE : 2 * RATE] == -7).all()
    assert (agent[: RATE] == 0).all() and (agent[2 * RATE:] == 0).all()


def test_audio_goes_to_disk_as_the_call_goes_and_memory_stays_small(tmp_path):
    clock = SampleClock()
    rec = recorder(tmp_path, clock)
    peak = 0
    for k in range(120 * 50):  # two minutes
        clock.to((k + 1) * FRAME)
        rec.caller(frame(1))
        if k % 500 == 0:  # every 10 s the agent queues a 5 s answer at once
            for _ in range(250):
                rec.agent(frame(2))
        peak = max(peak, rec.buffered_bytes)
        if k % 250 == 0:
            # The file on disk is a valid WAV of all but the last few seconds, while the call goes on.
            on_disk = len(read_wav(rec.path))
            assert (k + 1) * FRAME - on_disk <= (SETTLE_SECONDS + FLUSH_SECONDS) * RATE
    # The caller's last SETTLE + FLUSH seconds and a queued answer, never the whole call.
    side = 2  # bytes a sample
    assert peak <= (SETTLE_SECONDS + FLUSH_SECONDS + 0.02) * RATE * side + 5 * RATE * side
    rec.close()
    audio = read_wav(rec.path)
    assert len(audio) == 120 * RATE
    assert (audio[:, 0] == 1).all()
    answer = slice(FRAME, FRAME + 5 * RATE)  # queued at the end of the first frame, heard from then
    assert (audio[answer, 1] == 2).all() and (audio[answer.stop : 10 * RATE + FRAME, 1] == 0).all()


def test_agent_audio_queued_beyond_the_cap_is_dropped_and_counted(tmp_path):
    clock = SampleClock()
    rec = recorder(tmp_path, clock)
    clock.to(FRAME)
    for _ in range(int((MAX_AHEAD_SECONDS + 10) * 50)):
        rec.agent(frame(3))
    assert rec.dropped_samples == 10 * RATE
    rec.close()
    assert len(read_wav(rec.path)) == FRAME + MAX_AHEAD_SECONDS * RATE


def test_a_recording_is_a_valid_wav_from_the_moment_it_is_created(tmp_path):
    rec = recorder(tmp_path, SampleClock())
    assert len(read_wav(rec.path)) == 0
    with pytest.raises(FileExistsError):  # never over another recording
        recorder(tmp_path, SampleClock())
    rec.close()


def killed_mid_write(tmp_path: Path, seconds: int = 3, name: str = "call-1-1700000000000.wav") -> tuple[Path, int]:
    """A recording whose process died inside a write: audio past what the header says, the last
    frame cut in half. Returns its path and the frames it holds whole."""
    clock = SampleClock()
    rec = recorder(tmp_path, clock, name)
    for k in range(seconds * 50):
        clock.to((k + 1) * FRAME)
        rec.caller(frame(5))
    header_says = len(read_wav(rec.path))
    with open(rec.path, "ab") as file:  # the half-done write: 100 whole frames and half of one
        file.write(np.full((100, 2), 6, dtype="<i2").tobytes() + b"\x06\x00")
    return rec.path, header_says + 100


def test_repair_makes_the_header_say_what_the_file_holds(tmp_path):
    path, frames = killed_mid_write(tmp_path)
    assert not read_layout(path).consistent
    assert repair_wav(path)
    audio = read_wav(path)
    assert len(audio) == frames and (audio[-100:] == 6).all() and (audio[: frames - 100, 0] == 5).all()
    assert read_layout(path).consistent and os.path.getsize(path) == 44 + 4 * frames
    assert not repair_wav(path)  # nothing left to do


def test_repair_of_a_header_claiming_more_than_the_disk_holds(tmp_path):
    path, _ = killed_mid_write(tmp_path)
    repair_wav(path)
    with open(path, "r+b") as file:  # a power cut: the header was written, the last audio not
        file.truncate(44 + 4 * 1000 + 3)
    assert repair_wav(path)
    assert len(read_wav(path)) == 1000


def test_files_that_are_not_recordings_are_left_alone(tmp_path):
    other = tmp_path / "notes.wav"
    other.write_bytes(b"not a wav at all")
    assert read_layout(other) is None and not repair_wav(other)
    assert other.read_bytes() == b"not a wav at all"


@dataclass
class Call:
    id: str
    is_final: bool


class Calls:
    def __init__(self, *calls: Call):
        self.calls = {call.id: call for call in calls}
        self.forgotten: list[tuple[str, str]] = []

    async def get(self, call_id):
        return self.calls.get(call_id)

    async def forget_recording(self, call_id, name):
        self.forgotten.append((call_id, name))


def set_age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_repair_leaves_what_may_still_be_written(tmp_path):
    live, _ = killed_mid_write(tmp_path, name="live-1700000000000.wav")  # its call goes on
    over, _ = killed_mid_write(tmp_path, name="over-1700000000001.wav")  # its call has ended
    stale, _ = killed_mid_write(tmp_path, name="gone-1700000000002.wav")  # no record, untouched for long
    set_age(stale, STALE_SECONDS + 10)
    live_bytes = live.read_bytes()
    upkeep = RecordingUpkeep([RecordingDir(tmp_path, None)], Calls(Call("live", False), Call("over", True)))
    assert sorted(asyncio.run(upkeep.repair())) == sorted([over, stale])
    assert live.read_bytes() == live_bytes
    assert read_layout(over).consistent and read_layout(stale).consistent


def test_the_sweep_deletes_old_recordings_once_also_when_replicas_sweep_together(tmp_path):
    kept_dir, swept_dir = tmp_path / "kept", tmp_path / "swept"
    kept_dir.mkdir()
    swept_dir.mkdir()
    old = [swept_dir / f"call-{i}-1700000000000.wav" for i in range(20)]
    young = swept_dir / "call-x-1700000000000.wav"
    forever = kept_dir / "call-y-1700000000000.wav"
    for path in [*old, young, forever]:
        path.write_bytes(b"RIFF")
    for path in [*old, forever]:
        set_age(path, 3 * 86400)
    set_age(young, 86400 - 60)
    calls = Calls()
    directories = [RecordingDir(swept_dir, 1), RecordingDir(kept_dir, None)]
    replicas = [RecordingUpkeep(directories, calls) for _ in range(3)]

    async def sweep_together():
        return await asyncio.gather(*(replica.sweep() for replica in replicas))

    results = asyncio.run(sweep_together())
    assert all(not path.exists() for path in old) and young.exists() and forever.exists()
    # Each file was deleted by one replica or another; each call told at least once (it is idempotent).
    assert set().union(*map(set, results)) == set(old)
    assert {name for _, name in calls.forgotten} == {path.name for path in old}
    assert asyncio.run(replicas[0].sweep()) == []  # nothing more to do


@dataclass
class Route:
    recording_dir: str | None
    retention_days: int | None = None


def test_routes_sharing_a_directory_keep_its_files_as_long_as_the_longest_of_them():
    dirs = recording_dirs([Route("a", 7), Route("a", 30), Route("b", 7), Route("b"), Route(None), Route("c", 1)])
    assert {(str(d.path), d.retention_days) for d in dirs} == {("a", 30), ("b", None), ("c", 1)}


def test_a_snapshot_is_only_served_from_the_recording_directories(tmp_path):
    inside, outside = tmp_path / "recordings", tmp_path / "elsewhere"
    rec = CallRecorder(outside / "call-1-1.wav", RATE, SampleClock(), writer=Inline())
    rec.close()
    assert snapshot(rec.path, [inside]) is None
    inside.mkdir()
    (inside / "link.wav").symlink_to(rec.path)  # a link out of the directory does not count as in it
    assert snapshot(inside / "link.wav", [inside]) is None
    assert snapshot(rec.path, [outside]).size == 44


def test_a_snapshot_says_what_it_holds_whatever_the_header_on_disk_says(tmp_path):
    path, frames = killed_mid_write(tmp_path)
    with open(path, "r+b") as file:  # the header claims far more than is there
        file.seek(40)
        file.write(struct.pack("<I", 10**8))
    found = snapshot(path, [tmp_path])
    served = tmp_path / "served.wav"
    served.write_bytes(b"".join(found.chunks(chunk_bytes=1000)))
    assert len(read_wav(served)) == frames and found.size == served.stat().st_size
