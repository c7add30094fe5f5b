"""Loudness, true peak, normalization and export of one 2-minute loop at 32 kHz.

Prints each stage's wall time (median of 3 cold runs), its speed in audio seconds per second, and its
ratio to the same-run floor: one bare libsndfile Vorbis encode of the same audio. The last row is what a
build does per track: normalize, then export, sharing one Vorbis encode.

Run: .venv/bin/python bench/export_speed.py [SECONDS] [RATE]
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from chiptune_forge import export
from chiptune_forge.export import (
    VORBIS_CHUNK_FRAMES,
    VORBIS_QUALITY,
    export_track,
    measure_loudness,
    normalize,
    true_peak_db,
)
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


def bare_vorbis(path: Path, audio: np.ndarray, rate: int) -> None:
    """One plain libsndfile Vorbis encode at the export's quality, in the export's chunk size."""
    with sf.SoundFile(path, "w", rate, 2, format="OGG", subtype="VORBIS",
                      compression_level=1.0 - VORBIS_QUALITY) as f:
        for i in range(0, audio.shape[0], VORBIS_CHUNK_FRAMES):
            f.write(audio[i:i + VORBIS_CHUNK_FRAMES])


def build_export(track: TrackAudio, folder: Path) -> None:
    """What a build does per track: loudness measured once, normalized, exported (one Vorbis encode)."""
    loudness = measure_loudness(track)
    normalized, gain = normalize(track, loudness_lufs=loudness)
    export_track(normalized, folder, "c", ("ogg",), loudness_lufs=loudness + gain)


def timed(fn: Callable[[], object]) -> float:
    """Median of 3 cold runs: the export module's memory of its last Vorbis encode is cleared first."""
    times = []
    for _ in range(3):
        export._last_vorbis.clear()
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
            "bare vorbis encode (floor)": lambda: bare_vorbis(Path(tmp) / "floor.ogg", audio, rate),
            "measure_loudness": lambda: measure_loudness(track),
            "true_peak_db (4x)": lambda: true_peak_db(audio, rate, intro),
            "normalize (+ vorbis check)": lambda: normalize(track),
            "export ogg": lambda: export_track(normalized, Path(tmp), "a", ("ogg",)),
            "export ogg+wav, split, godot": lambda: export_track(normalized, Path(tmp), "b", ("ogg", "wav"),
                                                                 godot_import=True, split=True),
            "normalize + export ogg (a build)": lambda: build_export(track, Path(tmp)),
        }
        results = {name: timed(fn) for name, fn in stages.items()}
    floor = results["bare vorbis encode (floor)"]
    print(f"{seconds:.0f} s of stereo audio at {rate} Hz")
    for name, t in results.items():
        print(f"  {name:32s} {t:7.3f} s  {seconds / t:8.1f}x real time  {t / floor:5.2f}x the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
