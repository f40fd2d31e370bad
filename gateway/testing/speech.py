"""Speech for the test doubles: `Speech` (mono 16-bit PCM and its rate, read from a WAV), the WAVs
shipped with the package (`shipped_wav`: a greeting and an answer for the agent, an utterance for
the caller) and `Utterances`, which tells when a caller has finished saying something.

`FakeUltravox.converse()` uses them to stand in for a real agent (``gateway demo`` runs it so)."""

from __future__ import annotations

import dataclasses
import importlib.resources
import wave
from pathlib import Path

import numpy as np

from ..media.codecs import Resampler

__all__ = ["PAUSE_MS", "SHIPPED_SPEECH", "Speech", "Utterances", "shipped_wav"]

# The WAVs in gateway/testing/sounds (8 kHz mono 16-bit; sounds/make.sh makes them): what the
# stand-in agent says first and after each thing it hears, and a caller who waits for the greeting,
# asks something, then pauses.
SHIPPED_SPEECH = ("greeting", "answer", "caller")
# The pause that ends an utterance (`Utterances`), by default.
PAUSE_MS = 600.0


def shipped_wav(name: str) -> Path:
    """The absolute path of a WAV shipped with the package (one of SHIPPED_SPEECH)."""
    if name not in SHIPPED_SPEECH:
        raise ValueError(f"no shipped speech {name!r}; there are {', '.join(SHIPPED_SPEECH)}")
    # pip installs packages unpacked, so the resource is a file on disk with a lasting path.
    return Path(str(importlib.resources.files("gateway.testing").joinpath("sounds", f"{name}.wav")))


@dataclasses.dataclass(frozen=True)
class Speech:
    """Mono 16-bit little-endian PCM at `rate` Hz."""

    pcm: bytes
    rate: int

    @classmethod
    def from_wav(cls, path: str | Path) -> "Speech":
        """A 16-bit WAV (the left channel of a stereo one)."""
        with wave.open(str(path), "rb") as source:
            if source.getsampwidth() != 2:
                raise ValueError(f"{path}: only 16-bit WAV files are supported")
            samples = np.frombuffer(source.readframes(source.getnframes()), dtype="<i2")
            channels, rate = source.getnchannels(), source.getframerate()
        return cls(samples.reshape(-1, channels)[:, 0].astype("<i2").tobytes(), rate)

    @classmethod
    def shipped(cls, name: str) -> "Speech":
        return cls.from_wav(shipped_wav(name))

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / self.rate

    def at(self, rate: int) -> bytes:
        """The PCM at another rate."""
        return Resampler(self.rate, rate).convert(self.pcm)


class Utterances:
    """Tells when a caller has said something and stopped: at least `min_speech_ms` of frames louder
    than `threshold` (RMS of 16-bit samples), then `silence_ms` of quiet. Quiet is the silence the
    caller sent (counted in audio, so a caller sending faster than real time pauses as long) plus
    the time since it last sent anything (the caller's clock, `now`): a caller who stops sending
    audio at all has stopped speaking too, and frames held up on the way are no pause."""

    def __init__(self, rate: int, *, threshold: float = 500.0, min_speech_ms: float = 200.0,
                 silence_ms: float = PAUSE_MS) -> None:
        self.rate = rate
        self.threshold = threshold
        self.min_speech_ms = min_speech_ms
        self.silence_ms = silence_ms
        self._voiced_ms = 0.0  # of the utterance under way
        self._quiet_ms = 0.0  # of audio heard since its last voiced frame
        self._last_voiced: float | None = None  # when the utterance under way was last heard voiced
        self._last_heard: float | None = None  # when the last frame came

    def hear(self, pcm: bytes, now: float) -> None:
        samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)
        duration_ms = 1000.0 * samples.size / self.rate
        self._last_heard = now
        if samples.size and float(np.sqrt(np.mean(samples**2))) >= self.threshold:
            self._voiced_ms += duration_ms
            self._quiet_ms = 0.0
            self._last_voiced = now
        elif self._last_voiced is not None:
            self._quiet_ms += duration_ms

    def finished(self, now: float) -> bool:
        """True once for each utterance, when its closing silence has lasted long enough."""
        if self._last_voiced is None or self._last_heard is None:
            return False
        if self._quiet_ms + (now - self._last_heard) * 1000.0 < self.silence_ms:
            return False
        done = self._voiced_ms >= self.min_speech_ms
        self._voiced_ms, self._quiet_ms, self._last_voiced = 0.0, 0.0, None
        return done
