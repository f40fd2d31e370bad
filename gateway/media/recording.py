"""A stereo WAV of a bridged call: the caller on the left, the agent on the right.

Both sides are placed on one timeline by when they would be heard. The caller's audio is heard
as it arrives. The agent's audio arrives ahead of time (Ultravox keeps a large client buffer) and
is heard in order, one chunk after the other; a barge-in clear drops what had not been heard yet.
"""

from __future__ import annotations

import time
import wave
from pathlib import Path

import numpy as np


class _Track:
    def __init__(self) -> None:
        self.chunks: list[tuple[int, np.ndarray]] = []  # (first sample, samples)
        self.cursor = 0  # where the next chunk starts

    def place(self, samples: np.ndarray, now: int, *, queued: bool) -> None:
        # Queued audio (the agent's) follows what is already waiting; live audio starts now.
        start = max(self.cursor, now) if queued else max(self.cursor, now - len(samples))
        self.chunks.append((start, samples))
        self.cursor = start + len(samples)

    def cut(self, now: int) -> None:
        """Drop everything after `now`: it was cleared before anyone heard it."""
        kept = []
        for start, samples in self.chunks:
            if start < now:
                kept.append((start, samples[: now - start]))
        self.chunks = kept
        self.cursor = min(self.cursor, now)

    @property
    def end(self) -> int:
        return max((start + len(samples) for start, samples in self.chunks), default=0)


def _samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")  # an odd trailing byte is dropped


class CallRecorder:
    def __init__(self, path: Path, rate: int, clock=time.monotonic):
        self.path = path
        self.rate = rate
        self._clock = clock
        self._started = clock()
        self._caller = _Track()
        self._agent = _Track()

    def _now(self) -> int:
        return int((self._clock() - self._started) * self.rate)

    def caller(self, pcm: bytes) -> None:
        self._caller.place(_samples(pcm), self._now(), queued=False)

    def agent(self, pcm: bytes) -> None:
        self._agent.place(_samples(pcm), self._now(), queued=True)

    @property
    def agent_queued_seconds(self) -> float:
        """Agent audio sent to the carrier but, by the clock, not played yet."""
        return max(0, self._agent.cursor - self._now()) / self.rate

    def clear(self) -> None:
        self._agent.cut(self._now())

    def write(self) -> Path:
        """Write the WAV (blocking: run it in a thread)."""
        length = max(self._caller.end, self._agent.end)
        stereo = np.zeros((length, 2), dtype="<i2")
        for channel, track in enumerate((self._caller, self._agent)):
            for start, samples in track.chunks:
                stereo[start : start + len(samples), channel] = samples
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with wave.open(str(self.path), "wb") as out:
            out.setnchannels(2)
            out.setsampwidth(2)
            out.setframerate(self.rate)
            out.writeframes(stereo.tobytes())
        return self.path
