"""Render speed: a 2-minute piece through `chiptune-forge render`, against FluidSynth on the same MIDI.

Four processes are timed on the same MIDI file, alternating, several times each (medians are printed):
  cli     `chiptune-forge render IN.mid -o OUT.wav` (everything the command does: the piece at the chip's level)
  cli-lufs  the same with `--loudness -16`: normalized, true peak checked, NAME.json written (what a loop
          export and the build do to every track)
  engine  a bare process that imports the renderer, reads the MIDI, calls render_piece and writes a
          16-bit WAV: the cost of the sampler itself, without what the command adds around it
  fluid   `fluidsynth -ni -q -F OUT.wav -r 32000 SOUNDFONT IN.mid` with a Debian General MIDI SoundFont
Targets: cli at most 0.5 x FluidSynth's wall time, peak memory at most 250 MB. Each process's CPU time
(user + system, with the processes it waited for) is printed too: on a busy machine it moves less than wall
time. On Linux with two cores the command mixes the voices in a second process, so its CPU time exceeds its
wall time; its peak is that of its largest process.

The piece is `Chrono_SNES_Chrono Trigger_Secret of the Forest.mid` from ../shared/corpus/vgmidi, or a
generated 2-minute stand-in where that is absent. The package is byte-compiled first, as an installed
package is (this checkout may run with PYTHONDONTWRITEBYTECODE set, which would add compile time to
every run). Nothing here asserts a time; it prints numbers and same-run ratios.

    python bench/render_speed.py [--runs 3] [--preset snes] [--midi FILE]
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIECE = REPO.parent / "shared" / "corpus" / "vgmidi" / "Chrono_SNES_Chrono Trigger_Secret of the Forest.mid"
SOUNDFONTS = ("/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/share/sounds/sf2/FluidR3_GM.sf2",
              "/usr/share/soundfonts/default.sf2")
TARGET_RATIO = 0.5
TARGET_PEAK_MB = 250

ENGINE = """
import sys
import numpy as np
import soundfile
from chiptune_forge.midi import read_midi
from chiptune_forge.presets import load_preset
from chiptune_forge.render import render_piece
audio = render_piece(read_midi(sys.argv[1]), load_preset(sys.argv[3]))
block = np.empty((65536, 2), dtype=np.float32)
with soundfile.SoundFile(sys.argv[2], "w", 32000, 2, "PCM_16") as f:
    for b in range(0, len(audio), len(block)):
        part = block[:len(audio) - b] if b + len(block) > len(audio) else block
        np.multiply(audio[b:b + len(part)], 32768.0, out=part)
        np.clip(np.rint(part, out=part), -32768, 32767, out=part)
        f.write(part.astype(np.int16))
"""


def stand_in(path: Path) -> None:
    """A 2-minute, 4/4, 78 qpm piece with melody, chords and bass (used when the corpus is absent)."""
    sys.path.insert(0, str(REPO))
    from chiptune_forge.midi import Note, Piece, TempoChange, write_midi

    beat = 60 / 78
    notes = []
    roots = [48, 45, 41, 43]
    for bar in range(40):
        root = roots[bar % 4]
        t0 = bar * 4 * beat
        notes.append(Note(root - 12, 90, t0, t0 + 4 * beat))
        for k in range(4):
            for interval in (12, 16, 19):
                notes.append(Note(root + interval, 70, t0 + k * beat, t0 + (k + 0.9) * beat))
        for k in range(8):
            pitch = 72 + (3 * bar + 5 * k) % 12
            notes.append(Note(pitch, 100, t0 + k * beat / 2, t0 + (k + 0.8) * beat / 2))
    write_midi(Piece(notes, [TempoChange(0.0, 0.0, 78.0)]), path)


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}\n{err}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--preset", default="snes")
    parser.add_argument("--midi", type=Path, default=None)
    args = parser.parse_args()
    compileall.compile_dir(str(REPO / "chiptune_forge"), quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        midi = args.midi or PIECE
        if not midi.is_file():
            midi = Path(tmp) / "stand_in.mid"
            stand_in(midi)
        cli = shutil.which("chiptune-forge", path=str(Path(sys.executable).parent))
        commands = {
            "cli": ([cli] if cli else [sys.executable, "-m", "chiptune_forge"])
            + ["render", str(midi), "-o", f"{tmp}/cli.wav", "--preset", args.preset],
            "cli-lufs": ([cli] if cli else [sys.executable, "-m", "chiptune_forge"])
            + ["render", str(midi), "-o", f"{tmp}/lufs.wav", "--preset", args.preset, "--loudness", "-16"],
            "engine": [sys.executable, "-c", ENGINE, str(midi), f"{tmp}/engine.wav", args.preset],
        }
        fluid = shutil.which("fluidsynth")
        soundfont = next((s for s in SOUNDFONTS if Path(s).is_file()), None)
        if fluid and soundfont:
            commands["fluid"] = [fluid, "-ni", "-q", "-F", f"{tmp}/fluid.wav", "-r", "32000", soundfont, str(midi)]
        else:
            print("fluidsynth or a General MIDI SoundFont is missing "
                  "(apt-get install fluidsynth timgm6mb-soundfont): timing ours only")
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, cmd in commands.items():
                results[name].append(timed(cmd))
    print(f"piece: {midi.name}; preset {args.preset}; {args.runs} runs each, medians")
    walls = {name: statistics.median(w for w, _, _ in runs) for name, runs in results.items()}
    cpus = {name: statistics.median(c for _, c, _ in runs) for name, runs in results.items()}
    peaks = {name: max(p for _, _, p in runs) for name, runs in results.items()}
    for name in commands:
        line = f"  {name:<8} {walls[name]:6.3f} s wall  {cpus[name]:6.3f} s CPU   peak {peaks[name]:6.1f} MB"
        if "fluid" in walls and name != "fluid":
            line += (f"   {walls[name] / walls['fluid']:.2f} x FluidSynth (wall)"
                     f"  {cpus[name] / cpus['fluid']:.2f} x (CPU)")
        print(line)
    if "fluid" in walls:
        print(f"target: cli <= {TARGET_RATIO} x FluidSynth, peak <= {TARGET_PEAK_MB} MB")


if __name__ == "__main__":
    main()
