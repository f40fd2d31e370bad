"""Recordings of bridged calls: a stereo WAV per stretch of a call, caller left, agent right,
written to disk as the call goes; and the upkeep of the directories they live in.

Both sides are placed on one timeline by when they would be heard. The caller's audio is heard
as it arrives. The agent's audio arrives ahead of time (Ultravox keeps a large client buffer) and
is heard in order, one chunk after the other; a barge-in clear drops what had not been heard yet.

Streamed, not held: audio more than SETTLE_SECONDS old can no longer change (a clear cuts only
what is still ahead of now, and the caller's audio lands at most a frame in the past), so it goes
to the open file in blocks of at least FLUSH_SECONDS. What a call keeps in memory is those few
seconds plus the agent's audio queued ahead of now (at most MAX_AHEAD_SECONDS; more is dropped and
counted). Blocks are written by a small thread pool that all recorders share: a 1 s block takes
40-60 µs to write to the page cache (bench/recording.py), but writeback throttling or a network
filesystem can stall a write for far longer, and the event loop relays every call's 20 ms frames.
Each write also patches the header's sizes (`Wave_write.writeframes`, where `writeframesraw`
would leave them to `close`), so the file is a valid WAV of everything written so far, while the
call goes on and after a crash; `RecordingUpkeep.repair` fixes the rest (a write cut short).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
import wave
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

log = logging.getLogger("gateway.media")

SETTLE_SECONDS = 0.5
FLUSH_SECONDS = 1.0
# Ultravox sends at most its client buffer (30 s in bridge mode) ahead; twice that is a bug.
MAX_AHEAD_SECONDS = 60.0
CHANNELS, SAMPLE_BYTES = 2, 2

# Shared by every recorder of the process; a recorder has at most one block in flight.
WRITERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="recording")


class _Track:
    """One side's audio not yet on disk: (first sample, samples), in order, not overlapping."""

    def __init__(self) -> None:
        self.chunks: deque[tuple[int, np.ndarray]] = deque()
        self.cursor = 0  # where the next queued chunk starts

    def add(self, start: int, samples: np.ndarray) -> None:
        self.chunks.append((start, samples))
        self.cursor = start + len(samples)

    def cut(self, at: int) -> None:
        """Drop everything after `at`: it was cleared before anyone heard it."""
        while self.chunks and self.chunks[-1][0] >= at:
            self.chunks.pop()
        if self.chunks:
            start, samples = self.chunks[-1]
            self.chunks[-1] = (start, samples[: at - start])
        self.cursor = min(self.cursor, at)

    def take(self, until: int) -> list[tuple[int, np.ndarray]]:
        """Remove and return the audio before `until`."""
        taken = []
        while self.chunks and self.chunks[0][0] < until:
            start, samples = self.chunks.popleft()
            if start + len(samples) > until:
                self.chunks.appendleft((until, samples[until - start:]))
                samples = samples[: until - start]
            taken.append((start, samples))
        return taken

    @property
    def end(self) -> int:
        return self.chunks[-1][0] + len(self.chunks[-1][1]) if self.chunks else 0

    @property
    def nbytes(self) -> int:
        return sum(samples.nbytes for _, samples in self.chunks)


def _samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")  # an odd trailing byte is dropped


def _fill(channel: np.ndarray, pieces: list[tuple[int, np.ndarray]], origin: int) -> None:
    """Copy `pieces` into `channel` (which starts at sample `origin`), each run of back-to-back
    pieces in one copy: a block holds some fifty frames a side."""
    i = 0
    while i < len(pieces):
        j = i + 1
        while j < len(pieces) and pieces[j][0] == pieces[j - 1][0] + len(pieces[j - 1][1]):
            j += 1
        run = pieces[i][1] if j == i + 1 else np.concatenate([samples for _, samples in pieces[i:j]])
        start = pieces[i][0] - origin
        channel[start : start + len(run)] = run
        i = j


class CallRecorder:
    """Creates `path` (blocking: construct it in a thread) and records one stretch of a call into it.

    `caller`, `agent` and `clear` are called on the event loop as the audio passes; `close` (blocking)
    writes the rest.
    """

    def __init__(self, path: Path, rate: int, clock=time.monotonic, *, writer: Executor = WRITERS):
        self.path = path
        self.rate = rate
        self._clock = clock
        self._writer = writer
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "xb")  # never over another recording
        try:
            self._wav = wave.open(self._file, "wb")
            self._wav.setnchannels(CHANNELS)
            self._wav.setsampwidth(SAMPLE_BYTES)
            self._wav.setframerate(rate)
            self._wav.writeframes(b"")  # the header: a valid (empty) WAV from the start
            self._file.flush()
        except BaseException:
            self._file.close()
            raise
        self._started = clock()
        self._caller = _Track()
        self._agent = _Track()
        self._written = 0  # samples a side handed to the file
        self._in_flight: Future | None = None
        self._settle = int(SETTLE_SECONDS * rate)
        self._block = int(FLUSH_SECONDS * rate)
        self._max_ahead = int(MAX_AHEAD_SECONDS * rate)
        self.failure: OSError | None = None  # a write failed: the rest of the call is not recorded
        self.dropped_samples = 0  # audio further than MAX_AHEAD_SECONDS ahead of now

    def _now(self) -> int:
        return int((self._clock() - self._started) * self.rate)

    def caller(self, pcm: bytes) -> None:
        samples, now = _samples(pcm), self._now()
        self._place(self._caller, samples, max(self._caller.cursor, now - len(samples)), now)

    def agent(self, pcm: bytes) -> None:
        # Queued: it follows what is already waiting to be heard.
        now = self._now()
        self._place(self._agent, _samples(pcm), max(self._agent.cursor, now), now)

    def clear(self) -> None:
        now = self._now()
        self._agent.cut(now)
        self._flush_due(now)

    @property
    def agent_queued_seconds(self) -> float:
        """Agent audio sent to the carrier but, by the clock, not played yet."""
        return max(0, self._agent.cursor - self._now()) / self.rate

    @property
    def buffered_bytes(self) -> int:
        """Audio held in memory, not yet handed to the file."""
        return self._caller.nbytes + self._agent.nbytes

    def _place(self, track: _Track, samples: np.ndarray, start: int, now: int) -> None:
        start = max(start, self._written)  # what is on disk stays as it is
        if len(samples) == 0:
            return
        if start + len(samples) > now + self._max_ahead:
            self.dropped_samples += len(samples)
        else:
            track.add(start, samples)
        self._flush_due(now)

    def _flush_due(self, now: int) -> None:
        settled = now - self._settle
        if settled - self._written < self._block:
            return
        if self._in_flight is not None and not self._in_flight.done():
            return  # the disk is slow: the block grows until the last one is written
        block = self._take(settled)
        if self.failure is None:
            self._in_flight = self._writer.submit(self._write, block)

    def _take(self, until: int) -> np.ndarray:
        block = np.zeros((max(until - self._written, 0), CHANNELS), dtype="<i2")
        for channel, track in enumerate((self._caller, self._agent)):
            _fill(block[:, channel], track.take(until), self._written)
        self._written = max(until, self._written)
        return block

    def _write(self, block: np.ndarray) -> None:
        if not len(block):
            return
        try:
            self._wav.writeframes(block.tobytes())  # and patches the header's sizes
            self._file.flush()
        except OSError as error:
            if self.failure is None:
                log.error("recording %s: cannot write, the rest of the call is not recorded: %s", self.path, error)
            self.failure = error

    def close(self) -> Path:
        """Write what is left and close the file (blocking: run it in a thread). Raises the OSError
        that stopped the recording, if one did (what was written before it stays)."""
        if self._in_flight is not None:
            wait_for_futures([self._in_flight])
        block = self._take(max(self._caller.end, self._agent.end, self._written))
        try:
            if self.failure is None:
                self._write(block)
            self._wav.close()
        except OSError as error:
            self.failure = self.failure or error
        finally:
            self._file.close()
        if self.dropped_samples:
            log.warning("recording %s: dropped %.1f s of audio queued more than %.0f s ahead",
                        self.path, self.dropped_samples / self.rate, MAX_AHEAD_SECONDS)
        if self.failure is not None:
            raise self.failure
        return self.path


# --- the files: names, layout, repair, retention ---------------------------------------------------

# A live recorder writes at least every SETTLE + FLUSH seconds while audio flows: a file left this
# long is no one's any more (a replica sharing the directory may still be writing a younger one).
STALE_SECONDS = 120.0
SUFFIX = ".wav"


def recording_file(directory: str | Path, call_id: str) -> Path:
    """Where a stretch of a call starting now is recorded: one file per stretch (a return from a
    transfer starts another), named by the call and the time."""
    return Path(directory) / f"{call_id}-{int(time.time() * 1000)}{SUFFIX}"


def call_id_of(path: Path) -> str | None:
    call_id, _, millis = path.stem.rpartition("-")
    return call_id if call_id and millis.isdigit() else None


@dataclass(frozen=True)
class WavLayout:
    """Where a PCM WAV's audio sits and what its header says about it."""

    file_bytes: int
    riff_bytes: int  # as the header says (everything after the first 8 bytes)
    data_offset: int
    data_bytes: int  # as the header says
    frame_bytes: int
    header: bytes  # everything before the audio

    @property
    def audio_on_disk(self) -> int:
        """Whole frames of audio the file holds."""
        available = max(self.file_bytes - self.data_offset, 0)
        return available - available % self.frame_bytes

    @property
    def consistent(self) -> bool:
        return (self.data_bytes == self.audio_on_disk == self.file_bytes - self.data_offset
                and self.riff_bytes == self.file_bytes - 8)


def read_layout(path: Path) -> WavLayout | None:
    """The layout of a RIFF/WAVE file whose audio is its last chunk, as recorders write them; None
    for anything else."""
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
            size = os.fstat(file.fileno()).st_size
    except OSError:
        return None
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    (riff_bytes,) = struct.unpack_from("<I", head, 4)
    position, frame_bytes = 12, None
    while position + 8 <= len(head):
        kind, length = struct.unpack_from("<4sI", head, position)
        body = position + 8
        if kind == b"fmt " and body + 16 <= len(head):
            (block_align,) = struct.unpack_from("<H", head, body + 12)
            frame_bytes = block_align or None
        elif kind == b"data":
            if not frame_bytes:
                return None
            return WavLayout(size, riff_bytes, body, length, frame_bytes, head[:body])
        position = body + length + (length & 1)
    return None


def repair_wav(path: Path) -> bool:
    """Make the header agree with the audio on disk, cut to whole frames (blocking). Whether the
    file needed it."""
    layout = read_layout(path)
    if layout is None or layout.consistent:
        return False
    audio = layout.audio_on_disk
    with open(path, "r+b") as file:
        file.truncate(layout.data_offset + audio)
        file.seek(4)
        file.write(struct.pack("<I", layout.data_offset + audio - 8))
        file.seek(layout.data_offset - 4)
        file.write(struct.pack("<I", audio))
    return True


@dataclass(frozen=True)
class Snapshot:
    """A recording as it is when looked at: a valid WAV of `size` bytes, also while it is still
    being written (it grows after the snapshot; what is read stops where the snapshot does)."""

    path: Path
    header: bytes  # its sizes say what the snapshot holds, whatever the header on disk says now
    audio_bytes: int

    @property
    def size(self) -> int:
        return len(self.header) + self.audio_bytes

    def chunks(self, chunk_bytes: int = 256 * 1024) -> Iterator[bytes]:
        """The WAV's bytes (blocking)."""
        yield self.header
        with open(self.path, "rb") as file:
            file.seek(len(self.header))
            left = self.audio_bytes
            while left > 0 and (chunk := file.read(min(chunk_bytes, left))):
                left -= len(chunk)
                yield chunk


def snapshot(path: Path, directories: Iterable[Path]) -> Snapshot | None:
    """The recording at `path` if it is a WAV inside one of `directories` (blocking)."""
    try:
        resolved = path.resolve(strict=True)
    except OSError:
        return None
    if not any(resolved.is_relative_to(directory.resolve()) for directory in directories):
        log.warning("recording %s is outside the recording directories; not served", path)
        return None
    layout = read_layout(resolved)
    if layout is None:
        return None
    audio = min(layout.data_bytes, layout.audio_on_disk)
    header = bytearray(layout.header)
    struct.pack_into("<I", header, 4, layout.data_offset + audio - 8)
    struct.pack_into("<I", header, layout.data_offset - 4, audio)
    return Snapshot(resolved, bytes(header), audio)


@dataclass(frozen=True)
class RecordingDir:
    path: Path
    retention_days: int | None  # None: kept for ever


class _Route(Protocol):
    recording_dir: str | None
    retention_days: int | None


def recording_dirs(routes: Iterable[_Route]) -> list[RecordingDir]:
    """Each configured directory once. Routes sharing one keep its files as long as the one keeping
    them longest does (a file's route is not in its name, and none is deleted early)."""
    longest: dict[Path, int] = {}
    for_ever: set[Path] = set()
    for route in routes:
        if route.recording_dir:
            path = Path(route.recording_dir)
            longest[path] = max(longest.get(path, 0), route.retention_days or 0)
            if route.retention_days is None:
                for_ever.add(path)
    return [RecordingDir(path, None if path in for_ever else days) for path, days in longest.items()]


class _Calls(Protocol):
    async def get(self, call_id: str): ...

    async def forget_recording(self, call_id: str, name: str) -> None: ...


class RecordingUpkeep:
    """Keeps the recording directories in order: repairs what a crash left, deletes recordings past
    their route's retention_days. Every step is idempotent and safe on several replicas sharing the
    directories and the store at once; it is scheduled elsewhere (at start, then hourly)."""

    def __init__(self, directories: list[RecordingDir], calls: _Calls, *, wall_clock: Callable[[], float] = time.time):
        self.directories = directories
        self.calls = calls
        self._wall_clock = wall_clock

    async def run(self) -> None:
        await self.sweep()
        await self.repair()

    async def sweep(self) -> list[Path]:
        """Delete the recordings older than their directory's retention and take them off their calls.
        Age is the file's mtime, which a recorder moves at every write: a live recording is never old."""
        deleted = []
        for directory in self.directories:
            if directory.retention_days is None:
                continue
            cutoff = self._wall_clock() - directory.retention_days * 86400
            for path in await asyncio.to_thread(_delete_older, directory.path, cutoff):
                call_id = call_id_of(path)
                if call_id:
                    await self.calls.forget_recording(call_id, path.name)
                deleted.append(path)
        if deleted:
            log.info("recordings: deleted %d past their retention", len(deleted))
        return deleted

    async def repair(self) -> list[Path]:
        """Repair the recordings a killed process left with wrong header sizes: those of calls that are
        over, or untouched for STALE_SECONDS (no live recorder writes so rarely)."""
        repaired = []
        for directory in self.directories:
            stale_before = self._wall_clock() - STALE_SECONDS
            for path, mtime in await asyncio.to_thread(_inconsistent, directory.path):
                if mtime >= stale_before and not await self._call_is_over(path):
                    continue  # maybe still being written, here or on another replica
                if await asyncio.to_thread(repair_wav, path):
                    log.warning("recording %s: repaired (its writer stopped mid-call)", path)
                    repaired.append(path)
        return repaired

    async def _call_is_over(self, path: Path) -> bool:
        call_id = call_id_of(path)
        record = await self.calls.get(call_id) if call_id else None
        return record is not None and record.is_final


def _recordings(directory: Path) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            yield from (entry for entry in entries if entry.name.endswith(SUFFIX) and entry.is_file())
    except FileNotFoundError:
        return


def _delete_older(directory: Path, cutoff: float) -> list[Path]:
    deleted = []
    for entry in _recordings(directory):
        path = Path(entry.path)
        try:
            if entry.stat().st_mtime >= cutoff:
                continue
            path.unlink(missing_ok=True)  # missing: another replica's sweep got there first
        except FileNotFoundError:
            continue
        except OSError as error:
            log.error("recording %s: cannot delete it: %s", path, error)
            continue
        deleted.append(path)
    return deleted


def _inconsistent(directory: Path) -> list[tuple[Path, float]]:
    found = []
    for entry in _recordings(directory):
        layout = read_layout(Path(entry.path))
        if layout is not None and not layout.consistent:
            try:
                found.append((Path(entry.path), entry.stat().st_mtime))
            except FileNotFoundError:
                continue
    return found

