"""The built-in instruments: procedural waveforms made here, BRR-encoded, looped on block boundaries.

Nothing is downloaded or sampled: each instrument is a short computed waveform, as SNES soundtracks used
short looped samples to fit 64 KiB of audio RAM. Pitched instruments loop a single cycle (or two) of 64 or
128 samples at 32 kHz, so their pitch comes out exact; sounds that evolve (pluck, bell) compute a few dozen
changing cycles first and then loop the last one. The drum kit uses one-shot samples for kick, snare and
toms, and the DSP's noise generator for hi-hats and cymbals.

Samples are built and encoded on first use and kept for the life of the process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

from .brr import BrrSample, encode_brr
from .dsp import DSP_RATE, Envelope, SampleSource, lfsr_states

BUILTIN_PREFIX = "builtin:"
NOISE_CLOCK = 31  # noise clock rate used by the drum kit (32 kHz steps: bright white noise)
PEAK = 0.8  # waveform peak (1.0 = the 15-bit sample range); leaves room for Gaussian overshoot


@dataclass(frozen=True)
class Instrument:
    """A sampled instrument: how to make its waveform, the pitch it sounds at, and its default envelope."""

    name: str
    description: str
    envelope: Envelope
    make: Callable[[], tuple[np.ndarray, int | None]]  # waveform in [-1, 1], loop start (None = one-shot)
    rate: float = DSP_RATE  # the rate the sample is meant to be played at
    root_hz: float = DSP_RATE / 64  # the frequency it sounds at when played at that rate

    def pitch_ratio(self, hz: float) -> float:
        """Playback rate relative to 32 kHz (pitch value / 0x1000) that makes this sample sound at `hz`."""
        return self.rate / DSP_RATE * hz / self.root_hz


@dataclass(frozen=True)
class DrumHit:
    """What one General MIDI drum key plays: a sample (or the noise generator), its pitch, level, envelope.

    `hold` is the shortest time the key is held, so that a one-tick drum note still rings out.
    """

    sound: str  # a drum sample's name, or "noise"
    ratio: float  # playback speed relative to the sample's own rate (ignored for noise)
    volume: float
    envelope: Envelope
    hold: float


# -------------------------------------------------------------------------------------------- waveforms


def _normalized(x: np.ndarray, peak: float = PEAK) -> np.ndarray:
    x = x - x.mean()
    return x * (peak / np.max(np.abs(x)))


def _additive(amps: np.ndarray, length: int) -> np.ndarray:
    """One cycle of `length` samples from harmonic amplitudes amps[0] (fundamental), amps[1], ..."""
    k = np.arange(1, len(amps) + 1)[:, None]
    t = np.arange(length)[None, :] / length
    return (amps[:, None] * np.sin(2 * np.pi * k * t)).sum(axis=0)


def _band_limited(length: int, slope: float, odd_only: bool = False) -> np.ndarray:
    """Harmonic amplitudes 1/k**slope up to the cycle's Nyquist, Lanczos-tapered to tame the ringing."""
    k = np.arange(1, length // 2)
    amps = k**-slope * np.sinc(k / (length // 2))
    if odd_only:
        amps[1::2] = 0.0
    return amps


def _pulse(duty: float) -> Callable[[], tuple[np.ndarray, int | None]]:
    def make() -> tuple[np.ndarray, int | None]:
        phase = np.arange(64) / 64
        return _normalized(np.where(phase < duty, 1.0, -1.0), 0.6), 0

    return make


def _triangle() -> tuple[np.ndarray, int | None]:
    phase = (np.arange(64) + 0.5) / 64
    return _normalized(1 - 4 * np.abs(phase - 0.5)), 0


def _flute() -> tuple[np.ndarray, int | None]:
    return _normalized(_additive(np.array([1.0, 0.18, 0.09, 0.03, 0.015]), 64)), 0


def _saw() -> tuple[np.ndarray, int | None]:
    return _normalized(_additive(_band_limited(64, 1.0), 64), 0.7), 0


def _strings() -> tuple[np.ndarray, int | None]:
    amps = _band_limited(64, 1.35)
    amps[2:6] *= 1.3  # a little body in the low-mid harmonics
    return _normalized(_additive(amps, 64)), 0


def _organ() -> tuple[np.ndarray, int | None]:
    amps = np.zeros(16)
    for harmonic, level in ((1, 1.0), (2, 0.7), (3, 0.5), (4, 0.35), (6, 0.22), (8, 0.16), (10, 0.08)):
        amps[harmonic - 1] = level
    return _normalized(_additive(amps, 64)), 0


def _bass() -> tuple[np.ndarray, int | None]:
    saw = _band_limited(128, 1.6)
    square = _band_limited(128, 1.6, odd_only=True)
    return _normalized(_additive(0.6 * saw + 0.5 * square, 128)), 0


Frame = Callable[[np.ndarray | float, np.ndarray], np.ndarray]


def _evolving(cycles: int, cycle: int, frame: Frame, loop_cycles: int = 1) -> tuple[np.ndarray, int | None]:
    """`cycles` changing cycles, then the last state frozen and looped over `loop_cycles` cycles.

    frame(progress, t) gives the waveform at times t (in cycles) with the sound's state at `progress` (0..1,
    a scalar or one value per sample). Within the attack the state moves continuously; in the loop it stays
    fixed, so the loop is seamless.
    """
    t = np.arange(cycles * cycle) / cycle
    attack = frame(t / cycles, t)
    tail_t = cycles + np.arange(loop_cycles * cycle) / cycle
    loop = frame(1.0, tail_t)
    return _normalized(np.concatenate((attack, loop))), cycles * cycle


def _pluck() -> tuple[np.ndarray, int | None]:
    k = np.arange(1, 28)[:, None]
    base = (k**-0.9) * np.sinc(k / 32)

    def frame(progress, t):
        decay = np.exp(-np.asarray(progress) * (0.4 + 0.28 * k) * 3.0)
        return (base * decay * np.sin(2 * np.pi * k * t)).sum(axis=0)

    return _evolving(24, 64, frame)


def _bell() -> tuple[np.ndarray, int | None]:
    def frame(progress, t):
        index = 0.9 + 2.6 * np.exp(-4.0 * np.asarray(progress))
        return np.sin(2 * np.pi * t + index * np.sin(2 * np.pi * 3.5 * t))

    return _evolving(32, 64, frame, loop_cycles=2)


def _lfsr_noise(n: int) -> np.ndarray:
    """Deterministic white noise in [-1, 1] from the DSP's own noise register sequence."""
    states = lfsr_states()
    return (states[np.arange(n) * 7 % len(states)] / 16384.0) - 1.0


def _kick() -> tuple[np.ndarray, int | None]:
    rate, seconds = 12000, 0.2
    t = np.arange(int(rate * seconds)) / rate
    freq = 48 + 110 * np.exp(-t / 0.025)
    phase = 2 * np.pi * np.cumsum(freq) / rate
    body = np.sin(phase) * np.exp(-t / 0.09)
    click = _lfsr_noise(len(t)) * np.exp(-t / 0.002) * 0.3
    return _normalized(body + click, 0.9), None


def _snare() -> tuple[np.ndarray, int | None]:
    rate, seconds = 16000, 0.16
    t = np.arange(int(rate * seconds)) / rate
    tone = np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.03)
    noise = _lfsr_noise(len(t))
    noise = np.diff(noise, prepend=0.0) * 0.5 + noise * 0.5  # tilt the noise toward the top
    return _normalized(0.7 * tone + noise * np.exp(-t / 0.05), 0.9), None


# ------------------------------------------------------------------------------------------- the registry

_ADSR_HOLD = Envelope(attack=15, decay=7, sustain_level=7, sustain_rate=0)

INSTRUMENTS: dict[str, Instrument] = {
    inst.name: inst
    for inst in (
        Instrument("pulse50", "square wave (50% pulse), the classic chip lead",
                   Envelope(15, 5, 6, 12), _pulse(0.5)),
        Instrument("pulse25", "25% pulse, thinner and nasal", Envelope(15, 5, 6, 12), _pulse(0.25)),
        Instrument("pulse12", "12.5% pulse, reedy and bright", Envelope(15, 5, 6, 12), _pulse(0.125)),
        Instrument("triangle", "triangle wave, soft and hollow", Envelope(15, 4, 6, 10), _triangle),
        Instrument("flute", "flute-like near-sine with a slow attack", Envelope(10, 3, 6, 8), _flute),
        Instrument("saw", "band-limited sawtooth, bright brass/synth lead", Envelope(14, 4, 6, 11), _saw),
        Instrument("strings", "string-ensemble sawtooth with a bowed attack", Envelope(9, 2, 6, 6), _strings),
        Instrument("organ", "drawbar organ, steady", _ADSR_HOLD, _organ),
        Instrument("pluck", "plucked string: bright attack that mellows", Envelope(15, 2, 2, 16), _pluck),
        Instrument("bass", "round synth bass (saw + square, low-passed)", Envelope(15, 4, 5, 12), _bass,
                   root_hz=DSP_RATE / 128),
        Instrument("bell", "FM bell (carrier:modulator 1:3.5), decaying", Envelope(15, 1, 2, 14), _bell),
    )
}

# One-shot drum samples, played by the kit at fixed speeds (not pitched instruments of their own).
DRUM_SAMPLES: dict[str, Instrument] = {
    inst.name: inst
    for inst in (
        Instrument("kick", "kick drum", _ADSR_HOLD, _kick, rate=12000),
        Instrument("snare", "snare drum", _ADSR_HOLD, _snare, rate=16000),
    )
}

KIT_NAME = "kit"
KIT_DESCRIPTION = "General MIDI drum kit: sampled kick/snare/toms, noise hi-hats and cymbals"

_HAT = Envelope(attack=15, decay=7, sustain_level=0, sustain_rate=24)
_OPEN_HAT = Envelope(attack=15, decay=4, sustain_level=1, sustain_rate=20)
_CYMBAL = Envelope(attack=15, decay=2, sustain_level=2, sustain_rate=17, release=22)


def _drum_map() -> dict[int, DrumHit]:
    kick = DrumHit("kick", 1.0, 1.0, _ADSR_HOLD, 0.2)
    snare = DrumHit("snare", 1.0, 0.8, _ADSR_HOLD, 0.16)
    hits = {35: DrumHit("kick", 0.9, 1.0, _ADSR_HOLD, 0.2), 36: kick, 38: snare,
            37: DrumHit("snare", 1.4, 0.45, _ADSR_HOLD, 0.05),
            39: DrumHit("snare", 1.25, 0.7, _ADSR_HOLD, 0.12),
            40: DrumHit("snare", 1.1, 0.8, _ADSR_HOLD, 0.16),
            42: DrumHit("noise", 1.0, 0.22, _HAT, 0.03), 44: DrumHit("noise", 1.0, 0.18, _HAT, 0.03),
            46: DrumHit("noise", 1.0, 0.2, _OPEN_HAT, 0.2),
            49: DrumHit("noise", 1.0, 0.2, _CYMBAL, 0.8), 57: DrumHit("noise", 1.0, 0.2, _CYMBAL, 0.8),
            52: DrumHit("noise", 1.0, 0.2, _CYMBAL, 0.6), 55: DrumHit("noise", 1.0, 0.18, _CYMBAL, 0.4),
            51: DrumHit("noise", 1.0, 0.12, _OPEN_HAT, 0.3), 59: DrumHit("noise", 1.0, 0.12, _OPEN_HAT, 0.3),
            53: DrumHit("noise", 1.0, 0.14, _OPEN_HAT, 0.2)}
    # Toms: the kick's sweep, pitched up from low floor tom (41) to high tom (50).
    for key in (41, 43, 45, 47, 48, 50):
        hits[key] = DrumHit("kick", 1.5 * 2 ** ((key - 41) / 12), 0.85, _ADSR_HOLD, 0.2)
    return hits


DRUM_MAP = _drum_map()
DEFAULT_DRUM = DRUM_MAP[42]  # keys the map does not know play as a closed hi-hat


def instrument_names() -> list[str]:
    """Every built-in instrument as presets spell it (`builtin:NAME`)."""
    return [BUILTIN_PREFIX + name for name in (*INSTRUMENTS, KIT_NAME)]


def describe_instruments() -> list[tuple[str, str]]:
    return [(BUILTIN_PREFIX + i.name, i.description) for i in INSTRUMENTS.values()] + [
        (BUILTIN_PREFIX + KIT_NAME, KIT_DESCRIPTION)]


def drum_hit(key: int) -> DrumHit:
    return DRUM_MAP.get(key, DEFAULT_DRUM)


def sample_rate_of(name: str) -> float:
    """The rate an instrument's or drum's sample is meant to be played at."""
    return (INSTRUMENTS.get(name) or DRUM_SAMPLES[name]).rate


@cache
def brr_sample(name: str) -> BrrSample:
    """An instrument's or drum's waveform, BRR-encoded (built on first use)."""
    wave, loop = (INSTRUMENTS.get(name) or DRUM_SAMPLES[name]).make()
    return encode_brr(wave, loop)


@cache
def sample_source(name: str) -> SampleSource:
    """The decoded, interpolation-ready form of an instrument's or drum's BRR sample."""
    brr = brr_sample(name)
    return SampleSource(brr.decode(), brr.loop_start, brr.num_blocks)
