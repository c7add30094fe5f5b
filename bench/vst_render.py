"""Our VST3 path against a bare pedalboard call rendering the same MIDI with the same plugin.

Target (issue 5): the plugin path adds at most 20% wall time. Both sides render a 2-minute part (a melody,
chords and a sustain pedal each bar) through the test instrument ForgeTestSynth (built from tests/fixtures/
if missing). The bare call gets the finished message list and the same number of frames our path rendered
(tail and latency included), so the difference is our overhead: the MIDI conversion, the worker round trip,
the control-aligned and cache-sized blocks, tail detection, latency trimming and the hand-over of the audio
through shared memory. Runs alternate in pairs; the verdict is the median of the pairs' ratios (robust to
the load of a shared machine drifting between runs).

Run: .venv/bin/python bench/vst_render.py [SECONDS] [RATE] [REPEATS]
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from chiptune_forge.midi import Note
from chiptune_forge.plugins import MidiMessage, PluginHost, import_pedalboard, plugin_spec, render_role, role_messages

TARGET = 1.20
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def synth_bundle() -> Path:
    spec = importlib.util.spec_from_file_location("build_plugins", FIXTURES / "build_plugins.py")
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder.build_test_plugins()["ForgeTestSynth"]


def part(seconds: float) -> tuple[list[Note], list[MidiMessage]]:
    """Eighth-note melody at 150 qpm over three-note chords, the pedal pressed and lifted every bar."""
    rng = np.random.default_rng(5)
    beat = 60 / 150
    notes, controls = [], []
    bar = 0
    while (bar + 1) * 4 * beat <= seconds:
        t0 = bar * 4 * beat
        root = 48 + int(rng.integers(0, 12))
        notes += [Note(root + i, 70, t0, t0 + 4 * beat - 0.05) for i in (0, 4, 7)]
        for k in range(8):
            start = t0 + k * beat / 2
            notes.append(Note(72 + int(rng.integers(-7, 8)), int(rng.integers(60, 120)), start, start + beat * 0.45))
        controls += [(bytes([0xB0, 64, 127]), t0 + 0.01), (bytes([0xB0, 64, 0]), t0 + 4 * beat - 0.02)]
        bar += 1
    return notes, controls


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 120.0
    rate = int(sys.argv[2]) if len(sys.argv) > 2 else 32000
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 11
    bundle = synth_bundle()
    notes, controls = part(seconds)
    messages = role_messages(notes, controls)
    settings = {"waveform": "saw", "release_s": 0.3}

    with PluginHost() as host:
        spec = plugin_spec(str(bundle), parameters=settings)
        start = time.perf_counter()
        audio = render_role(spec, notes, rate, controls=controls, host=host)
        cold = time.perf_counter() - start

        plugin = import_pedalboard().load_plugin(str(bundle), parameter_values=settings)
        frames = len(audio) + plugin.reported_latency_samples
        duration = (frames + 0.5) / rate

        def run_bare() -> float:
            start = time.perf_counter()
            plugin(messages, duration=duration, sample_rate=rate)
            return time.perf_counter() - start

        def run_ours() -> float:
            start = time.perf_counter()
            render_role(spec, notes, rate, controls=controls, host=host)
            return time.perf_counter() - start

        ours, bare = [], []
        for i in range(repeats):  # alternate which goes first, so that neither always runs on a warmer machine
            if i % 2:
                o, b = run_ours(), run_bare()
            else:
                b, o = run_bare(), run_ours()
            ours.append(o)
            bare.append(b)

    b, o = statistics.median(bare), statistics.median(ours)
    ratio = statistics.median(x / y for x, y in zip(ours, bare, strict=True))
    print(f"{len(notes)} notes, {len(controls)} pedal events, {seconds:g} s at {rate} Hz; "
          f"rendered {len(audio) / rate:.2f} s (tail included)")
    print(f"bare pedalboard call : {b * 1000:8.1f} ms (median of {repeats})")
    print(f"chiptune-forge path  : {o * 1000:8.1f} ms (median of {repeats}; worker warm, instance cached)")
    print(f"first call (starts the worker, loads the plugin): {cold * 1000:.0f} ms")
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"ratio (median of the paired runs' ratios) {ratio:.3f} = {(ratio - 1) * 100:+.1f}% "
          f"(target <= +{(TARGET - 1) * 100:.0f}%): {verdict}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
