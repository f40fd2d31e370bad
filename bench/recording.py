"""Memory and time of recording one bridged call: CallRecorder against the in-memory recorder it replaced.

    python bench/recording.py [--minutes 10] [--rates 8000,16000] [--baseline-ref 62c9b2f]

A simulated call on a clock of its own (no waiting): the caller's 20 ms frames, continuously; every
15 s the agent answers with 6 s of audio that arrives within half a second (Ultravox sends ahead of
playback), and every fourth answer is cut by a barge-in (clear) after 2 s. Peak memory is
tracemalloc's peak over the call and its end (the old recorder built the whole WAV at the end),
over what was allocated before the call started. The streaming recorder writes its blocks inline
here (on the caller's thread) so that its figure is not a thread's backlog; each block's write is
timed. The baseline is the recorder of `--baseline-ref` (the last commit with the in-memory one),
read with `git show`; without git it is left out. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import Executor, Future
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.media import recording  # noqa: E402

FRAME_SECONDS = 0.02


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedInline(Executor):
    """Runs each write at once and times it."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def submit(self, fn, /, *args, **kwargs):
        started = time.perf_counter()
        future = Future()
        future.set_result(fn(*args, **kwargs))
        self.seconds.append(time.perf_counter() - started)
        return future


def simulate(make_recorder, finish, rate: int, minutes: float, *, trace: bool) -> dict[str, float]:
    clock = FakeClock()
    rng = np.random.default_rng(1)
    samples = int(rate * FRAME_SECONDS)
    voice = [rng.integers(-8000, 8000, samples, dtype=np.int16).astype("<i2").tobytes() for _ in range(50)]
    frames = int(minutes * 60 / FRAME_SECONDS)
    if trace:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    recorder = make_recorder(clock)
    on_loop = 0.0
    turn = 0
    cut_at = None
    for k in range(frames):
        clock.now = (k + 1) * FRAME_SECONDS
        started = time.perf_counter()
        recorder.caller(voice[k % 50])  # a fresh bytes object per frame, as the carrier's are
        second = clock.now % 15
        if 1.0 <= second < 1.5:  # the answer's 300 frames come in 25 bursts over half a second
            for _ in range(12):
                recorder.agent(bytes(voice[(k + turn) % 50]))
            if second + FRAME_SECONDS >= 1.5:
                turn += 1
                cut_at = clock.now + 2.0 if turn % 4 == 0 else None
        if cut_at is not None and clock.now >= cut_at:
            recorder.clear()
            cut_at = None
        on_loop += time.perf_counter() - started
    started = time.perf_counter()
    path = finish(recorder)
    end_seconds = time.perf_counter() - started
    peak = 0
    if trace:
        peak = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
    return {"peak": peak, "on_loop_us_per_s": on_loop / (minutes * 60) * 1e6, "end_s": end_seconds,
            "file": path.stat().st_size}


def load_baseline(ref: str):
    try:
        source = subprocess.run(["git", "show", f"{ref}:gateway/media/recording.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"(no baseline: git show {ref} failed: {error})")
        return None
    module_path = Path(tempfile.mkdtemp()) / "baseline_recording.py"
    module_path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_recording", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CallRecorder


def recorders(rate: int, directory: Path, baseline):
    """(name, writer -> (clock -> recorder), finish) for each recorder measured."""
    files = iter(range(10**6))

    def streamed(writer):
        return lambda clock: recording.CallRecorder(directory / f"new-{rate}-{next(files)}.wav", rate, clock,
                                                    writer=writer)

    yield "streamed", streamed, lambda recorder: recorder.close()
    if baseline is not None:
        yield ("in memory (before)", lambda writer: lambda clock: baseline(directory / f"old-{rate}-{next(files)}.wav",
                                                                          rate, clock),
               lambda recorder: recorder.write())


def mib(value: float) -> str:
    return f"{value / 2**20:8.2f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rates", default="8000,16000")
    parser.add_argument("--baseline-ref", default="62c9b2f")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline_ref)
    with tempfile.TemporaryDirectory() as directory:
        for rate in map(int, args.rates.split(",")):
            peaks: dict[str, float] = {}
            print(f"\n{args.minutes:g}-minute call at {rate} Hz (stereo 16-bit: {rate * 4 / 1024:.0f} KiB a second on disk)")
            for name, make, finish in recorders(rate, Path(directory), baseline):
                # Memory with tracemalloc; times in a second run without it (it slows allocation down).
                memory = simulate(make(TimedInline()), finish, rate, args.minutes, trace=True)
                writer = TimedInline()
                timed = simulate(make(writer), finish, rate, args.minutes, trace=False)
                print(f"  {name:<20} peak {mib(memory['peak'])}   recorder calls {timed['on_loop_us_per_s']:4.0f} µs "
                      f"per call-second   at the end {timed['end_s'] * 1e3:6.1f} ms   file {mib(timed['file'])}")
                if writer.seconds:
                    blocks = sorted(writer.seconds[:-1])
                    print(f"    {len(blocks)} block writes of ~{recording.FLUSH_SECONDS:g} s (in the writer thread): "
                          f"p50 {statistics.median(blocks) * 1e6:.0f} µs, p99 {blocks[int(len(blocks) * 0.99)] * 1e6:.0f} "
                          f"µs, max {blocks[-1] * 1e6:.0f} µs")
                peaks[name] = memory["peak"]
            if len(peaks) == 2:
                print(f"  memory per call: {peaks['in memory (before)'] / max(peaks['streamed'], 1):.0f}x less")
    return 0


if __name__ == "__main__":
    sys.exit(main())
