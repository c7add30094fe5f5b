"""Loudness, true peak, normalization and export of one 2-minute loop at 32 kHz.

Prints each stage's wall time (median of 3), its speed in audio seconds per second, and the whole
normalize + export against the same-run floor of one bare Vorbis encode of the same audio.

Run: .venv/bin/python bench/export_speed.py [SECONDS] [RATE]
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from chiptune_forge.export import encode_vorbis, export_track, measure_loudness, normalize, true_peak_db
from chiptune_forge.loops import TrackAudio


def music(seconds: float, rate: int) -> np.ndarray:
    """Decaying square-ish notes on a 16th grid: dense, broadband, with transients, like a chip track."""
    rng = np.random.default_rng(0)
    frames = round(seconds * rate)
    out = np.zeros((frames, 2), np.float32)
    step = rate // 8
    t = np.arange(step * 2) / rate
    for start in range(0, frames - 2 * step, step):
        f = 110 * 2 ** (rng.integers(0, 36) / 12)
        note = np.tanh(3 * np.sin(2 * np.pi * f * t)) * np.exp(-t * 6) * 0.2
        pan = rng.random()
        out[start:start + len(t), 0] += note * (1 - pan)
        out[start:start + len(t), 1] += note * pan
    return out


def timed(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 120.0
    rate = int(sys.argv[2]) if len(sys.argv) > 2 else 32000
    audio = music(seconds, rate)
    intro = round(seconds / 8 * rate)
    track = TrackAudio(audio, rate, intro, audio.shape[0] - intro, 120.0, 56, 8)
    normalized = normalize(track)[0]
    with tempfile.TemporaryDirectory() as tmp:
        stages = {
            "bare vorbis encode (floor)": lambda: encode_vorbis(io.BytesIO(), audio, rate),
            "measure_loudness": lambda: measure_loudness(track),
            "true_peak_db (4x)": lambda: true_peak_db(audio, rate, intro),
            "normalize (+ vorbis check)": lambda: normalize(track),
            "export ogg": lambda: export_track(normalized, Path(tmp), "a", ("ogg",)),
            "export ogg+wav, split, godot": lambda: export_track(normalized, Path(tmp), "b", ("ogg", "wav"),
                                                                 godot_import=True, split=True),
        }
        results = {name: timed(fn) for name, fn in stages.items()}
    floor = results["bare vorbis encode (floor)"]
    print(f"{seconds:.0f} s of stereo audio at {rate} Hz")
    for name, t in results.items():
        print(f"  {name:32s} {t:7.3f} s  {seconds / t:8.1f}x real time  {t / floor:5.2f}x the floor")
    total = results["normalize (+ vorbis check)"] + results["export ogg"]
    print(f"  normalize + export ogg           {total:7.3f} s  {seconds / total:8.1f}x real time  "
          f"{total / floor:5.2f}x the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
