"""The echo unit and output stage: exact delay, FIR and feedback against a per-sample model."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from chiptune_forge.presets import parse_preset
from chiptune_forge.snes import echo as echo_module
from chiptune_forge.snes.echo import EchoSettings, Mixer
from chiptune_forge.workers import run_ahead


def clamp(x: int) -> int:
    return max(-0x8000, min(0x7FFF, x))


def wrap(x: int) -> int:
    return ((x + 0x8000) & 0xFFFF) - 0x8000


def reference_output(dry: np.ndarray, wet: np.ndarray, echo: EchoSettings, master: tuple[int, int]) -> np.ndarray:
    """The documented output stage, one sample at a time, with a real ring buffer of echo RAM."""
    frames = len(dry)
    ring = np.zeros((echo.delay, 2), dtype=np.int64)
    history = [[0] * 8 for _ in range(2)]  # oldest first
    out = np.zeros((frames, 2), dtype=np.int64)
    for n in range(frames):
        slot = n % echo.delay
        for ch in range(2):
            history[ch] = [*history[ch][1:], int(ring[slot, ch]) >> 1]
            taps = [(history[ch][i] * echo.fir[i]) >> 6 for i in range(8)]
            fir = clamp(wrap(sum(taps[:7])) + wrap(taps[7])) & ~1
            main = clamp(int(dry[n, ch]) + int(wet[n, ch]))
            out[n, ch] = clamp(wrap((main * master[ch]) >> 7) + wrap((fir * echo.volume[ch]) >> 7))
            ring[slot, ch] = clamp(clamp(int(wet[n, ch])) + wrap((fir * echo.feedback) >> 7)) & ~1
    return out


def run(dry: np.ndarray, wet: np.ndarray, echo: EchoSettings | None, master: tuple[int, int] = (127, 127)
        ) -> np.ndarray:
    mixer = Mixer(len(dry), echo)
    mixer.add(0, len(dry), False, lambda: (dry[:, 0], dry[:, 1]))
    mixer.add(0, len(wet), True, lambda: (wet[:, 0], wet[:, 1]))
    return np.rint(mixer.output(master) * 32768).astype(np.int64)


def impulse(frames: int, at: int, value: int = 20000) -> np.ndarray:
    x = np.zeros((frames, 2), dtype=np.int64)
    x[at] = value
    return x


@pytest.mark.parametrize("edl", [1, 3, 15])
def test_echo_appears_exactly_edl_times_512_samples_later(edl: int) -> None:
    delay = edl * 512
    echo = EchoSettings(edl, 0, (0, 0, 0, 0, 0, 0, 0, 127), (100, 100))
    frames = 2 * delay + 100
    out = run(np.zeros((frames, 2), dtype=np.int64), impulse(frames, 50), echo)
    nonzero = np.flatnonzero(out[:, 0])
    assert nonzero.tolist() == [50, 50 + delay]  # the dry impulse, then one echo (no feedback)


def test_fir_tap_0_reads_the_oldest_sample_and_feedback_repeats() -> None:
    echo = EchoSettings(1, 64, (127, 0, 0, 0, 0, 0, 0, 0), (127, 127))
    frames = 3 * 512 + 100
    out = run(np.zeros((frames, 2), dtype=np.int64), impulse(frames, 10), echo)
    hits = np.flatnonzero(out[:, 1])
    assert hits.tolist() == [10 + k * (512 + 7) for k in range(4)]  # each repeat one delay + 7 later
    assert abs(out[hits[2], 1]) < abs(out[hits[1], 1]) < abs(out[hits[0], 1])


@pytest.mark.parametrize("echo", [
    EchoSettings(1, 90, (0, 0, 0, 0, 24, 40, 40, 24), (60, 60)),
    EchoSettings(2, -70, (10, -20, 30, 40, 30, -20, 10, 50), (90, -90)),  # surround-style negative EVOL
    EchoSettings(1, 127, (127, 127, 127, 127, 127, 127, 127, -128), (127, 127)),  # overflowing FIR
    EchoSettings(1, 44, (0, 0, 0, 0, 0, 0, 64, 64), (36, 36)),  # two plain taps: summed in one step
    EchoSettings(1, 100, (64, 64, 0, 32, 0, 0, -16, 64), (80, 70)),  # overflowing, shifts and plain taps
    EchoSettings(1, 60, (0, 0, 0, 0, 0, 0, 0, 0), (80, 80)),  # no taps: the FIR output is silence
])
@pytest.mark.parametrize("window", [32768, 1024])  # the second mixes in several windows
def test_block_wise_echo_matches_the_per_sample_model(echo: EchoSettings, window: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(echo_module, "WINDOW", window)
    rng = np.random.default_rng(7)
    frames = 5000
    dry = rng.integers(-9000, 9000, (frames, 2))
    wet = rng.integers(-9000, 9000, (frames, 2)) * (rng.random((frames, 1)) < 0.2)
    master = (110, 96)
    expected = reference_output(dry, wet, echo, master)
    assert np.array_equal(run(dry, wet, echo, master), expected)


def test_without_echo_the_output_is_the_clamped_main_mix_times_mvol() -> None:
    dry = np.array([[40000, -40000], [1000, -1000], [0, 5]], dtype=np.int64)
    out = run(dry, np.zeros_like(dry), None, (64, 127))
    assert out.tolist() == [[(32767 * 64) >> 7, (-32768 * 127) >> 7], [500, -993], [0, 4]]


def test_delay_ms_maps_to_edl_steps_of_16_ms() -> None:
    preset = parse_preset(b"[echo]\ndelay_ms = 48\nfeedback = 0.5\n", "t", None)
    assert preset.echo is not None
    assert preset.echo.edl == 3 and preset.echo.delay == 1536  # 48 ms at 32 kHz
    assert preset.echo.feedback == round(0.5 * 127)


def test_tail_length_covers_the_decay() -> None:
    assert EchoSettings(4, 64, (127, 0, 0, 0, 0, 0, 0, 0), (50, 50)).tail_frames() > 4 * 2048
    assert EchoSettings(4, 0, (127, 0, 0, 0, 0, 0, 0, 0), (0, 0)).tail_frames() == 0


needs_fork = pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                                reason="the voices run ahead in a forked process on Linux with two cores")


@needs_fork
@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # other tests leave threads (TensorFlow's)
@pytest.mark.parametrize("echo", [None, EchoSettings(2, 70, (0, 0, 0, 0, 0, 0, 64, 64), (60, 50))])
def test_mixing_the_voices_in_a_second_process_gives_the_same_samples(echo: EchoSettings | None,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(echo_module, "WINDOW", 2048)  # many windows, so the ring of buses wraps round
    monkeypatch.setattr(echo_module, "can_run_ahead", lambda: True)  # whatever threads earlier tests left
    forks = []
    monkeypatch.setattr(echo_module, "run_ahead", lambda *a: forks.append(1) or run_ahead(*a))
    rng = np.random.default_rng(3)
    frames = 40000
    notes = [(int(start), int(start + length), bool(sends), rng.integers(-12000, 12000, (int(length), 2)))
             for start, length, sends in zip(rng.integers(0, frames, 60), rng.integers(1, 9000, 60),
                                             rng.random(60) < 0.5, strict=True)]

    def output(parallel: bool) -> tuple[np.ndarray, int]:
        mixer = Mixer(frames, echo)
        for start, end, sends, x in notes:
            mixer.add(start, end, sends, lambda x=x: (x[:, 0].astype(np.int32), x[:, 1].astype(np.int32)))
        return mixer.output((120, 100), parallel), mixer.clipped

    sequential, clipped = output(False)
    parallel, clipped_parallel = output(True)
    assert forks == [1]
    assert clipped > 0 and clipped_parallel == clipped  # the random sums overflow here and there
    assert np.array_equal(parallel, sequential)
