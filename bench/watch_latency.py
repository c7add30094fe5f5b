"""Watch-mode latency: from saving a preset change to the updated OGG being in place, for a 30 s track.

Target: at most 1 s. Baseline, measured in the same run: the same edit followed by a separate
`chiptune-forge build` process (what a developer would do without watch mode).

Run: .venv/bin/python bench/watch_latency.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mido

from chiptune_forge.presets import shipped_presets_dir

ROUNDS = 5
TARGET = 1.0


def thirty_second_song(path: Path) -> None:
    """15 bars of 4/4 at 120 qpm: a melody over chords and a bass line."""
    mid = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(120)))
    events = []
    for bar in range(15):
        root = [48, 53, 55, 45][bar % 4]
        t = bar * 1920
        for p in (root, root + 12 + 4, root + 12 + 7):
            events += [(t, "note_on", p), (t + 1900, "note_off", p)]
        for i, step in enumerate((0, 2, 4, 7, 9, 7, 4, 2)):
            events += [(t + i * 240, "note_on", root + 24 + step), (t + i * 240 + 220, "note_off", root + 24 + step)]
    now = 0
    for tick, kind, pitch in sorted(events, key=lambda e: (e[0], e[1] == "note_on")):
        track.append(mido.Message(kind, note=pitch, velocity=90 if kind == "note_on" else 0, time=tick - now))
        now = tick
    mid.save(str(path))


def wait_change(path: Path, old: float, timeout: float = 30) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            if path.stat().st_mtime_ns != old:
                return time.perf_counter()
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    raise SystemExit(f"{path} did not change within {timeout} s")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        preset = root / "mine.toml"
        shutil.copy(shipped_presets_dir() / "snes.toml", preset)
        thirty_second_song(root / "song.mid")
        manifest = root / "chiptune.toml"
        manifest.write_text('[project]\npreset = "mine.toml"\n\n[[track]]\nname = "level"\nmidi = "song.mid"\n'
                            "bars = 15\n")
        asset = root / "music" / "level.ogg"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "chiptune_forge", "watch", str(manifest)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if "watching" in line:
                break
        text = preset.read_text()
        latencies = []
        try:
            for i in range(ROUNDS):
                old = asset.stat().st_mtime_ns
                time.sleep(0.3)
                start = time.perf_counter()
                preset.write_text(text.replace("[master]\nvolume = ", f"[master]\nvolume = 0.{5 + i} #"))
                latencies.append(wait_change(asset, old) - start)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        builds = []
        for i in range(3):
            preset.write_text(text.replace("[master]\nvolume = ", f"[master]\nvolume = 0.{i + 1} #"))
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "chiptune_forge", "build", str(manifest)], check=True,
                           capture_output=True)
            builds.append(time.perf_counter() - start)
    watch_median = sorted(latencies)[len(latencies) // 2]
    build_median = sorted(builds)[1]
    print(f"30 s track, preset edit -> updated OGG in place: median {watch_median:.3f} s over {ROUNDS} saves "
          f"(min {min(latencies):.3f}, max {max(latencies):.3f}); target <= {TARGET} s")
    print(f"same edit + separate 'chiptune-forge build' process: median {build_median:.3f} s")
    print(f"ratio watch / build: {watch_median / build_median:.2f}")
    print(f"target <= {TARGET} s: {'met' if watch_median <= TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
