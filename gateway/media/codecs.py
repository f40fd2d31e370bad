"""Carrier audio <-> s16le PCM for bridge mode, frame by frame.

Carrier formats:
  * Twilio: mu-law 8 kHz ("mulaw", 8000).
  * Telnyx: RTP payloads; we ask for L16 at 16 kHz, which RTP sends in network byte order
    (RFC 3551 4.5.11) -> ("l16-be", 16000). Public Telnyx integrations (pipecat's
    TelnyxFrameSerializer, the Vision-Agents telnyx plugin) also read it as big-endian.
  * Plivo: audio/x-l16 16 kHz little-endian ("l16-le", 16000), or audio/x-mulaw 8 kHz.
Ultravox's serverWebSocket takes and sends s16le PCM at the rate the gateway chooses.

Frames are 20 ms and are forwarded as they arrive: nothing here buffers audio. Malformed input
(odd-length 16-bit payloads) is trimmed, never raised on, because one bad frame must not end a call.

Implementations were picked with bench/codecs.py (CPython 3.11, numpy 2.4, x86_64 dev VM,
per 20 ms frame):
  * G.711 decode/encode: audioop 0.1-0.5 us vs numpy lookup tables 1.5-1.6 us. At 160 samples
    numpy's per-call overhead dominates, so audioop wins. The numpy tables are kept as the
    fallback for interpreters without audioop (3.13+ without audioop-lts) and for big-endian
    hosts (audioop works in native byte order). They are bit-exact with audioop on all 65536
    inputs (tests/test_codecs.py).
  * L16 byteswap (640 B): array.array.byteswap 0.24 us, audioop.byteswap 0.39 us, numpy 0.82 us.
  * Resampling: audioop.ratecv costs 2.3-4.1 us but only interpolates linearly, with no
    anti-image/anti-alias filter. A speech-band signal (300-3400 Hz) upsampled 8k->16k comes
    out at 22 dB SNR (images at 4.6-7.7 kHz). Going 16k->8k with energy above 4 kHz (TTS
    sibilants) it aliases down to 10 dB. Its 8k->16k->8k round trip looks perfect (82 dB)
    only because decimating by 2 picks the original samples back out. The polyphase
    Kaiser-windowed sinc below costs 10-11 us (8k<->16k; 13-17 us with 24k) and gives 61 dB
    up, 52 dB down (sibilants removed) and 56 dB round trip, for 0.97 ms of group delay per
    direction. 11 us per 20 ms frame is 0.05% of a core, and the quality is far above
    G.711's own ~38 dB. So the resampler is numpy.
"""

from __future__ import annotations

import array
import math
import sys
import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

try:
    with warnings.catch_warnings():
        # Deprecated (PEP 594) on 3.11/3.12; on 3.13+ the same module comes from audioop-lts.
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
except ImportError:  # pragma: no cover - only on 3.13+ without audioop-lts
    audioop = None  # type: ignore[assignment]

__all__ = ["AudioFormat", "decode", "encode", "Resampler", "Transcoder", "IMPLEMENTATION"]

MULAW, ALAW, L16_BE, L16_LE = "mulaw", "alaw", "l16-be", "l16-le"
_ENCODINGS = frozenset((MULAW, ALAW, L16_BE, L16_LE))


@dataclass(frozen=True)
class AudioFormat:
    encoding: str  # "mulaw" | "alaw" | "l16-be" | "l16-le"
    rate: int

    def __post_init__(self) -> None:
        # Fail at configuration time, not on the first frame of a call.
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"unknown audio encoding {self.encoding!r}")
        if not isinstance(self.rate, int) or self.rate <= 0:
            raise ValueError(f"invalid sample rate {self.rate!r}")

    @property
    def bytes_per_sample(self) -> int:
        return 1 if self.encoding in (MULAW, ALAW) else 2

    def frame_bytes(self, ms: int = 20) -> int:
        return self.rate * ms // 1000 * self.bytes_per_sample


# --- G.711, numpy tables (fallback; also the reference the tests compare audioop against) ------


@cache
def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype("<i2")


@cache
def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype("<i2")


def _all_pcm() -> np.ndarray:
    # Indexed by the sample's uint16 bit pattern, so encoding is one table lookup.
    return np.arange(65536, dtype=np.int32).astype(np.uint16).view(np.int16).astype(np.int32)


@cache
def _ulaw_encode_table() -> np.ndarray:
    # CCITT/Sun reference algorithm, as in audioop: 14-bit magnitude (sign by negation),
    # bias 33, clip 8159. ITU-T G.191's g711.c takes the ones' complement of negative samples
    # instead, which moves negative decision thresholds by one 14-bit step (508 of 65536
    # inputs land one code apart); both decode identically. We match audioop.
    v = _all_pcm() >> 2
    neg = v < 0
    mag = np.minimum(np.where(neg, -v, v), 8159) + 33
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), mag)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))
    return (code ^ np.where(neg, 0x7F, 0xFF)).astype(np.uint8)


@cache
def _alaw_encode_table() -> np.ndarray:
    v = _all_pcm() >> 3  # 13-bit, ones' complement magnitude for negatives (as audioop/G.711)
    neg = v < 0
    mag = np.where(neg, -v - 1, v)
    seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), mag)
    quant = np.where(seg < 2, mag >> 1, mag >> np.maximum(seg, 1)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | quant)
    return (code ^ np.where(neg, 0x55, 0xD5)).astype(np.uint8)


def _ulaw_decode_np(payload: bytes) -> bytes:
    return _ulaw_decode_table()[np.frombuffer(payload, np.uint8)].tobytes()


def _alaw_decode_np(payload: bytes) -> bytes:
    return _alaw_decode_table()[np.frombuffer(payload, np.uint8)].tobytes()


def _ulaw_encode_np(pcm: bytes) -> bytes:
    return _ulaw_encode_table()[np.frombuffer(pcm, "<u2", len(pcm) >> 1)].tobytes()


def _alaw_encode_np(pcm: bytes) -> bytes:
    return _alaw_encode_table()[np.frombuffer(pcm, "<u2", len(pcm) >> 1)].tobytes()


def _byteswap_np(data: bytes) -> bytes:
    return np.frombuffer(data, "<u2", len(data) >> 1).byteswap().tobytes()


def _byteswap_array(data: bytes) -> bytes:
    a = array.array("h")
    a.frombytes(data)
    a.byteswap()  # swaps each 2-byte item regardless of host order
    return a.tobytes()


# audioop works in host byte order; our PCM is little-endian by definition.
_USE_AUDIOOP = audioop is not None and sys.byteorder == "little"

if _USE_AUDIOOP:
    _ulaw_decode = lambda b: audioop.ulaw2lin(b, 2)  # noqa: E731
    _alaw_decode = lambda b: audioop.alaw2lin(b, 2)  # noqa: E731
    _ulaw_encode = lambda b: audioop.lin2ulaw(b, 2)  # noqa: E731
    _alaw_encode = lambda b: audioop.lin2alaw(b, 2)  # noqa: E731
else:  # pragma: no cover
    _ulaw_decode, _alaw_decode = _ulaw_decode_np, _alaw_decode_np
    _ulaw_encode, _alaw_encode = _ulaw_encode_np, _alaw_encode_np

_byteswap = _byteswap_array if array.array("h").itemsize == 2 else _byteswap_np

# Read by bench/codecs.py to mark the implementation in use.
IMPLEMENTATION = {
    "g711": "audioop" if _USE_AUDIOOP else "numpy",
    "byteswap": "array" if _byteswap is _byteswap_array else "numpy",
    "resample": "numpy-polyphase",
}


def _even(data: bytes) -> bytes:
    # A dangling byte is half a sample: drop it rather than fail the frame.
    return data[:-1] if len(data) & 1 else data


def decode(fmt: AudioFormat, payload: bytes) -> bytes:
    """Carrier payload -> s16le PCM at fmt.rate."""
    enc = fmt.encoding
    if enc == L16_LE:
        return _even(payload)  # already s16le: no copy
    if enc == L16_BE:
        return _byteswap(_even(payload))
    if enc == MULAW:
        return _ulaw_decode(payload)
    return _alaw_decode(payload)


def encode(fmt: AudioFormat, pcm: bytes) -> bytes:
    """s16le PCM at fmt.rate -> carrier payload."""
    pcm = _even(pcm)
    enc = fmt.encoding
    if enc == L16_LE:
        return pcm
    if enc == L16_BE:
        return _byteswap(pcm)
    if enc == MULAW:
        return _ulaw_encode(pcm)
    return _alaw_encode(pcm)


# --- Resampling ---------------------------------------------------------------------------------

# Filter length in samples at the lower of the two rates, and Kaiser beta. Span 16 at beta 5
# is the shortest filter measuring >50 dB both ways on speech-band audio (0.97 ms delay per
# direction at 8k<->16k). Span 12 gives 40-52 dB at 0.72 ms; span 8 only 31-39 dB at 0.47 ms.
_SPAN = 16
_BETA = 5.0
_CUTOFF = 1.0  # relative to the lower Nyquist frequency
# Up to this many polyphase branches, one np.correlate per branch beats gathering windows
# (10 us vs 35 us per 8k->16k frame). Unusual ratios (e.g. 44.1k) take the gather path.
_MAX_BRANCH_LOOP = 8


class Resampler:
    """Streaming rational resampler for s16le mono PCM (polyphase windowed-sinc FIR).

    State (filter history and output phase) carries across convert() calls, so chunked
    conversion matches one-shot conversion. Every output sample is emitted as soon as its
    newest input sample has arrived. The only latency is the filter's group delay
    (delay_seconds), and the total output length tracks input * to_rate / from_rate exactly:
    each chunk is within one sample of its ideal share.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError("sample rates must be positive")
        self.from_rate = from_rate
        self.to_rate = to_rate
        self.passthrough = from_rate == to_rate
        g = math.gcd(from_rate, to_rate)
        self._up = up = to_rate // g
        self._down = down = from_rate // g
        if self.passthrough:
            self.delay_seconds = 0.0
            return
        # Prototype lowpass at the upsampled rate, cut off at the lower Nyquist frequency.
        n_taps = -(-_SPAN * max(up, down) // up) * up
        self._k = k = n_taps // up  # taps per polyphase branch
        fc = 0.5 / max(up, down) * _CUTOFF
        t = np.arange(n_taps) - (n_taps - 1) / 2
        h = 2 * fc * np.sinc(2 * fc * t) * np.kaiser(n_taps, _BETA)
        bank = h.reshape(k, up).T  # bank[p][i] = h[p + i*up]
        # Unit overall DC gain. (Forcing every branch to exactly 1 flattens DC ripple but bends
        # the passband: it cost 3-4 dB of speech-band SNR when measured.)
        bank = bank * (up / bank.sum())
        # Reversed so a branch correlates with an ascending window of input samples.
        self._bank = np.ascontiguousarray(bank[:, ::-1])
        self._branches = [self._bank[p] for p in range(up)]
        self.delay_seconds = (n_taps - 1) / 2 / (from_rate * up)
        self.reset()

    def reset(self) -> None:
        """Forget history (e.g. after a barge-in clear) so old audio does not bleed in."""
        if self.passthrough:
            return
        self._hist = np.zeros(self._k - 1)
        self._n_in = 0  # input samples seen (reduced modulo the ratio period)
        self._n_out = 0  # output samples produced (same reduction)

    def convert(self, pcm: bytes) -> bytes:
        if self.passthrough:
            return pcm
        count_in = len(pcm) >> 1  # an odd trailing byte is dropped
        if not count_in:
            return b""
        up, down, k = self._up, self._down, self._k
        base = self._n_in
        n_in = base + count_in
        n0 = self._n_out
        # Output n needs input up to floor(n*down/up); emit every n whose input is here.
        n1 = (n_in * up + down - 1) // down
        buf = np.concatenate((self._hist, np.frombuffer(pcm, "<i2", count_in)))
        self._hist = buf[len(buf) - (k - 1) :]
        # Shift both counters by whole ratio periods to keep them small.
        q = min(n_in // down, n1 // up)
        self._n_in = n_in - q * down
        self._n_out = n1 - q * up
        count = n1 - n0
        if count <= 0:
            return b""
        # buf[j : j + k] ends at input sample floor(n*down/up) when j = that index - base.
        if up <= _MAX_BRANCH_LOOP:
            y = np.empty(count)
            for r in range(min(up, count)):
                t = (n0 + r) * down
                j = t // up - base
                m = (count - r + up - 1) // up  # outputs in this branch
                c = np.correlate(buf[j : j + (m - 1) * down + k], self._branches[t % up], "valid")
                y[r::up] = c[::down] if down > 1 else c
        else:
            ts = np.arange(n0, n1, dtype=np.int64) * down
            windows = sliding_window_view(buf, k)[ts // up - base]
            y = np.einsum("ij,ij->i", windows, self._bank[ts % up])
        np.rint(y, out=y)
        np.clip(y, -32768, 32767, out=y)
        return y.astype("<i2").tobytes()


class Transcoder:
    """One call's audio path: carrier payload <-> s16le PCM at pcm_rate (Ultravox side).

    Each direction has its own Resampler (passthrough when the rates match, which is the cheap
    case to aim for: choose pcm_rate = carrier rate).
    """

    def __init__(self, carrier_format: AudioFormat, pcm_rate: int) -> None:
        self.carrier_format = carrier_format
        self.pcm_rate = pcm_rate
        self.inbound = Resampler(carrier_format.rate, pcm_rate)  # carrier -> Ultravox
        self.outbound = Resampler(pcm_rate, carrier_format.rate)  # Ultravox -> carrier
        # Bound once; skipping the resampler entirely when rates match.
        self._in = None if self.inbound.passthrough else self.inbound.convert
        self._out = None if self.outbound.passthrough else self.outbound.convert

    def to_pcm(self, payload: bytes) -> bytes:
        pcm = decode(self.carrier_format, payload)
        return self._in(pcm) if self._in else pcm

    def from_pcm(self, pcm: bytes) -> bytes:
        if self._out:
            pcm = self._out(pcm)
        return encode(self.carrier_format, pcm)

    def reset_outbound(self) -> None:
        """After a barge-in clear: drop the outbound filter's memory of the discarded audio."""
        self.outbound.reset()


class Chunker:
    """Cuts outgoing audio into sizes the carrier accepts: a multiple of `multiple` bytes.

    The rest waits for the next audio rather than going out as a short packet (which some
    carriers play as a gap); a barge-in clear drops it with the rest of the queued audio.
    """

    def __init__(self, multiple: int) -> None:
        self.multiple = multiple
        self._rest = b""

    def take(self, payload: bytes) -> bytes:
        if self.multiple <= 1:
            return payload
        data = self._rest + payload if self._rest else payload
        cut = len(data) - len(data) % self.multiple
        self._rest = data[cut:]
        return data[:cut]

    def clear(self) -> None:
        self._rest = b""
