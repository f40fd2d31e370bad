"""Per-frame cost of the bridge-mode audio candidates: audioop vs numpy (vs array for byteswap).

    python bench/codecs.py [--frames 20000]

Times each candidate on one 20 ms frame (160 samples at 8 kHz, 320 at 16 kHz), the way bridge
mode calls them, and marks the one gateway/media/codecs.py uses. For resampling it also prints
quality: SNR of a synthetic voiced-speech signal (harmonics in 300-3400 Hz, varying pitch and
level) against the exact ideal output at the target rate. "down" adds 4.7-7.6 kHz tones (TTS
sibilants) that a 16k->8k converter must remove; "round trip" is 8k->16k->8k. Prints figures and
never asserts.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import timeit
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gateway.media import codecs  # noqa: E402
from gateway.media.codecs import AudioFormat, Resampler, Transcoder  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


def speech(t: np.ndarray, sibilants: bool = False) -> np.ndarray:
    phase = 2 * np.pi * (140.0 * t - 40.0 / (2 * np.pi * 1.3) * np.cos(2 * np.pi * 1.3 * t))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.7 * t) ** 2
    voiced = sum((1.5 if 4 <= h <= 7 else 1.0) / h * np.sin(h * phase + 0.7 * h) for h in range(3, 19))
    out = 9000.0 * envelope * voiced
    if sibilants:
        out = out + 9000.0 * sum(0.08 * np.sin(2 * np.pi * f * t + f) for f in (4700, 5300, 6100, 7000, 7600))
    return out


def timeline(rate: int, seconds: float, delay: float = 0.0) -> np.ndarray:
    return np.arange(int(rate * seconds)) / rate - delay


def pcm(x: np.ndarray) -> bytes:
    return np.clip(np.rint(x), -32768, 32767).astype("<i2").tobytes()


def snr_db(actual: bytes, reference: np.ndarray, skip: int) -> float:
    a = np.frombuffer(actual, "<i2").astype(np.float64)
    n = min(len(a), len(reference))
    a, r = a[skip : n - skip], reference[skip : n - skip]
    return float(10 * np.log10(np.sum(r**2) / np.sum((a - r) ** 2)))


class Ratecv:
    """audioop.ratecv wrapped as a streaming resampler (state carried between frames)."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self.from_rate, self.to_rate, self.state = from_rate, to_rate, None
        self.delay_seconds = 0.0  # linear interpolation: no filter delay

    def convert(self, data: bytes) -> bytes:
        out, self.state = audioop.ratecv(data, 2, 1, self.from_rate, self.to_rate, self.state)
        return out


def per_frame_us(fn, frames: int) -> float:
    fn()  # warm caches (numpy tables are built lazily)
    return min(timeit.repeat(fn, number=frames, repeat=5)) / frames * 1e6


def streamed(resampler, data: bytes, rate: int) -> bytes:
    step = rate // 50 * 2
    return b"".join(resampler.convert(data[i : i + step]) for i in range(0, len(data), step))


def quality(make) -> tuple[float, float, float]:
    up, down, down2 = make(8000, 16000), make(16000, 8000), make(16000, 8000)
    x8 = pcm(speech(timeline(8000, 2.0)))
    x16 = pcm(speech(timeline(16000, 2.0), sibilants=True))
    y_up = streamed(up, x8, 8000)
    q_up = snr_db(y_up, speech(timeline(16000, 2.0, up.delay_seconds)), 320)
    q_down = snr_db(streamed(down, x16, 16000), speech(timeline(8000, 2.0, down.delay_seconds)), 160)
    rt_delay = up.delay_seconds + down2.delay_seconds
    q_rt = snr_db(streamed(down2, y_up, 16000), speech(timeline(8000, 2.0, rt_delay)), 160)
    return q_up, q_down, q_rt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=20000, help="frames per timing run (best of 5)")
    args = parser.parse_args()
    n = args.frames
    impl = codecs.IMPLEMENTATION

    f8 = pcm(speech(timeline(8000, 0.02)))  # 160 samples, s16le
    f16 = pcm(speech(timeline(16000, 0.02)))  # 320 samples, s16le
    ulaw, alaw = audioop.lin2ulaw(f8, 2), audioop.lin2alaw(f8, 2)
    be16 = audioop.byteswap(f16, 2)

    print(f"Python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    print(f"per 20 ms frame, best of 5 x {n} frames; '*' = used by gateway/media/codecs.py\n")
    print(f"{'operation':<34}{'candidate':<20}{'us/frame':>9}")
    rows = [
        ("mu-law decode (160 B -> s16le)", [
            ("audioop", lambda: audioop.ulaw2lin(ulaw, 2), impl["g711"] == "audioop"),
            ("numpy table", lambda: codecs._ulaw_decode_np(ulaw), impl["g711"] == "numpy"),
        ]),
        ("mu-law encode (s16le -> 160 B)", [
            ("audioop", lambda: audioop.lin2ulaw(f8, 2), impl["g711"] == "audioop"),
            ("numpy table", lambda: codecs._ulaw_encode_np(f8), impl["g711"] == "numpy"),
        ]),
        ("A-law decode (160 B -> s16le)", [
            ("audioop", lambda: audioop.alaw2lin(alaw, 2), impl["g711"] == "audioop"),
            ("numpy table", lambda: codecs._alaw_decode_np(alaw), impl["g711"] == "numpy"),
        ]),
        ("A-law encode (s16le -> 160 B)", [
            ("audioop", lambda: audioop.lin2alaw(f8, 2), impl["g711"] == "audioop"),
            ("numpy table", lambda: codecs._alaw_encode_np(f8), impl["g711"] == "numpy"),
        ]),
        ("L16 byteswap (640 B)", [
            ("audioop.byteswap", lambda: audioop.byteswap(be16, 2), False),
            ("numpy", lambda: codecs._byteswap_np(be16), impl["byteswap"] == "numpy"),
            ("array.byteswap", lambda: codecs._byteswap_array(be16), impl["byteswap"] == "array"),
        ]),
    ]
    resamplings = (((8000, 16000), f8), ((16000, 8000), f16), ((16000, 24000), f16), ((8000, 24000), f8))
    for rates, frame in resamplings:
        ratecv, poly = Ratecv(*rates), Resampler(*rates)
        rows.append((f"resample {rates[0] // 1000}k -> {rates[1] // 1000}k", [
            ("audioop.ratecv", lambda r=ratecv, f=frame: r.convert(f), False),
            ("numpy polyphase", lambda r=poly, f=frame: r.convert(f), True),
        ]))
    for op, candidates in rows:
        for i, (name, fn, used) in enumerate(candidates):
            print(f"{op if i == 0 else '':<34}{name:<20}{per_frame_us(fn, n):>9.2f}{'  *' if used else ''}")

    print("\nresampling quality, SNR dB vs ideal (speech band 300-3400 Hz)")
    print(f"{'candidate':<20}{'up 8k->16k':>11}{'down 16k->8k':>14}{'round trip':>12}{'delay':>10}")
    for name, make in (("audioop.ratecv", Ratecv), ("numpy polyphase", Resampler)):
        q_up, q_down, q_rt = quality(make)
        delay = make(8000, 16000).delay_seconds * 1e3
        print(f"{name:<20}{q_up:>11.1f}{q_down:>14.1f}{q_rt:>12.1f}{delay:>8.2f}ms")

    print("\nwhole Transcoder per 20 ms frame (decode+resample / resample+encode)")
    print(f"{'carrier format':<30}{'pcm rate':>9}{'to_pcm us':>11}{'from_pcm us':>13}")
    setups = [
        ("Twilio mulaw 8k", AudioFormat("mulaw", 8000), 8000),
        ("Twilio mulaw 8k", AudioFormat("mulaw", 8000), 16000),
        ("Telnyx l16-be 16k", AudioFormat("l16-be", 16000), 16000),
        ("Telnyx l16-be 16k", AudioFormat("l16-be", 16000), 24000),
        ("Plivo l16-le 16k", AudioFormat("l16-le", 16000), 16000),
    ]
    for label, fmt, rate in setups:
        t = Transcoder(fmt, rate)
        payload = codecs.encode(fmt, pcm(speech(timeline(fmt.rate, 0.02))))
        out_frame = pcm(speech(timeline(rate, 0.02)))
        to_pcm = per_frame_us(lambda t=t, payload=payload: t.to_pcm(payload), n)
        from_pcm = per_frame_us(lambda t=t, out_frame=out_frame: t.from_pcm(out_frame), n)
        print(f"{label:<30}{rate:>9}{to_pcm:>11.2f}{from_pcm:>13.2f}")
    print(f"\ncodecs.IMPLEMENTATION = {impl}")


if __name__ == "__main__":
    main()
