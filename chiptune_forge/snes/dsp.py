"""The S-DSP voice pipeline, vectorized per note: pitch counter, Gaussian interpolation, envelopes, noise.

A voice's output is computed for a whole note at once with integer numpy arithmetic that matches the chip's
per-sample steps: the 14-bit pitch value is added to a position counter each 32 kHz sample; bits 12+ pick the
sample, bits 4-11 pick one of 256 Gaussian phases; the 4-tap result is scaled by the 11-bit envelope.

Where this differs from the chip, on purpose:
* Each voice's envelope counter starts at its key-on. The chip runs one global counter (with per-rate phase
  offsets), so a tick can come up to one period earlier or later there. Counting from key-on makes a note
  sound the same wherever it falls, which keeps repeated loop bodies bit-identical.
* Key-on and key-off take effect on any sample; the chip samples KON/KOFF every other sample. A note is
  therefore never moved by a sample, and music shifted by any whole number of samples renders shifted.
* The noise generator (the one thing shared by all voices) is clocked from the first sample of the render.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

DSP_RATE = 32000
VOICE_COUNT = 8
PITCH_ONE = 0x1000  # pitch value that plays a sample at 32 kHz
PITCH_MAX = 0x3FFF
ENV_MAX = 0x7FF
OUTPUT_DELAY = 6  # a keyed-on voice is silent for 5 samples of BRR prefetch, then sounds from the 6th
RELEASE_STEP = 8  # key-off release: envelope -= 8 per sample
LFSR_PERIOD = 0x7FFF
NEVER = 0  # rate 0: the counter never fires


@lru_cache(maxsize=1)
def rate_periods() -> np.ndarray:
    """Samples between envelope/noise ticks for each rate 0-31 (0 = never).

    Rates 1-27 step through three periods per octave (1, 3/4, 5/8 of a power of two, from 2048 down to 5);
    the fastest four are 4, 3, 2 and 1 samples.
    """
    periods = [NEVER]
    for octave in range(11, 2, -1):
        periods += [2**octave, 3 * 2 ** (octave - 2), 5 * 2 ** (octave - 3)]
    periods += [4, 3, 2, 1]
    return np.array(periods, dtype=np.int64)


@lru_cache(maxsize=1)
def gaussian_table() -> np.ndarray:
    """The 512-entry interpolation table, computed from its published formula rather than stored.

    The curve is a sinc (cut-off 1.28/1024 of the table span) under a Blackman window, sampled at 512
    half-integer points; then, for each of the 256 phases, the four entries the interpolator uses together
    are scaled so that they sum to 2048 (unity after the >> 11) and rounded half up.
    """
    k = np.arange(512) + 0.5
    x = np.pi * k / 1023
    blackman = 0.42 + 0.5 * np.cos(2 * x) + 0.08 * np.cos(4 * x)
    curve = (np.sin(np.pi * k * 1.28 / 1024) / k * blackman)[::-1]
    phase = np.arange(128)
    taps = np.stack([phase, phase + 256, 511 - phase, 255 - phase])
    table = np.zeros(512, dtype=np.int64)
    table[taps] = np.floor(curve[taps] * (2048.0 / curve[taps].sum(axis=0)) + 0.5)
    return table.astype(np.int32)


def wrap16(x: np.ndarray) -> np.ndarray:
    """Wrap to signed 16 bits, as a C cast to int16_t does."""
    return ((x + 0x8000) & 0xFFFF) - 0x8000


def clamp16(x: np.ndarray) -> np.ndarray:
    """Clamp to signed 16 bits, in place (two ufunc calls: cheaper than np.clip on small arrays)."""
    np.minimum(x, 0x7FFF, out=x)
    return np.maximum(x, -0x8000, out=x)


def pitch_value(ratio: float) -> int:
    """The 14-bit pitch register for a playback-rate ratio (1.0 = the sample's own rate at 32 kHz)."""
    return int(min(max(round(PITCH_ONE * ratio), 0), PITCH_MAX))


# ------------------------------------------------------------------------------------------ sample sources


def interpolate(ext: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Gaussian interpolation of sample data at position-counter values `pos` (int64), as the DSP does it.

    With i = pos >> 12 and phase f = bits 4-11, the four samples ext[i..i+3] (oldest first) are weighted by
    table entries 255-f, 511-f, 256+f and f; the first three products are summed and wrapped to 16 bits, the
    fourth is added, and the result is clamped with bit 0 cleared.
    """
    i = pos >> 12
    return _gaussian(ext[i], ext[i + 1], ext[i + 2], ext[i + 3], (pos >> 4) & 0xFF)


def interpolation_table(ext: np.ndarray, n: int) -> np.ndarray:
    """interpolate(ext, pos) for every position counter value pos = t << 4 with t < n * 256 (sample t >> 8,
    phase t & 255), as int32: the same arithmetic with a column of samples against a row of phases, each
    tap an outer product, so the whole table is made at once."""
    rows = np.arange(n)[:, None]
    out = _gaussian(ext[rows], ext[rows + 1], ext[rows + 2], ext[rows + 3], np.arange(256))
    return out.reshape(-1).astype(np.int32, copy=False)


def _gaussian(x0: np.ndarray, x1: np.ndarray, x2: np.ndarray, x3: np.ndarray, f: np.ndarray) -> np.ndarray:
    """The DSP's four-tap sum (see interpolate) of samples x0..x3 at phases f, broadcast against each other."""
    g = gaussian_table()
    out = (g[255 - f] * x0) >> 11
    out += (g[511 - f] * x1) >> 11
    out += (g[256 + f] * x2) >> 11
    out = wrap16(out)
    out += (g[f] * x3) >> 11
    clamp16(out)
    out &= ~1
    return out


class SampleSource:
    """A decoded BRR sample prepared for playback at any pitch (immutable once made, so it can be shared).

    Short samples (single-cycle loops) get a table of every position and phase, which turns a stream into
    one gather: the table index is simply pos >> 4.
    """

    TABLE_MAX_SAMPLES = 256

    def __init__(self, decoded: np.ndarray, loop_start: int | None, num_blocks: int) -> None:
        n = len(decoded)
        self.length = n
        self.loop_start = loop_start
        if loop_start is None:
            self.ext = np.concatenate((decoded, np.zeros(3, dtype=np.int32))).astype(np.int32)
            # The voice is silenced once the decoder reaches the end block, 12 samples ahead of playback.
            self.cut: int | None = (num_blocks - 1) * 16 - 12
        else:
            self.ext = np.concatenate((decoded, decoded[loop_start:loop_start + 3])).astype(np.int32)
            self.cut = None
        self.table: np.ndarray | None = None
        if n <= self.TABLE_MAX_SAMPLES:
            self.table = interpolation_table(self.ext, n)

    def audible_samples(self, pitch: int) -> int | None:
        """How many output samples a one-shot sample lasts at this pitch (None: it loops forever)."""
        if self.cut is None:
            return None
        return -(-(self.cut << 12) // max(pitch, 1))

    def stream(self, pitch: int, n: int) -> np.ndarray:
        """The interpolated output (before the envelope) for the first n samples after the voice starts.

        It depends only on the pitch value, since every key-on starts the position counter at 0.
        """
        end = self.length << 12
        if self.table is not None and self.loop_start == 0 and not end & (end - 1):
            # A single cycle looped from its start, a power of two long: the position modulo the loop is
            # the counter's low bits, which 32-bit arithmetic keeps exactly even when it wraps.
            pos = np.arange(n, dtype=np.uint32)
            pos *= pitch
            pos &= end - 1
            pos >>= 4
            return self.table[pos]
        pos = np.arange(0, n * pitch, pitch, dtype=np.int64)
        if self.loop_start is not None:
            # Positions only grow, so everything from the first one past the end wraps into the loop.
            start = self.loop_start << 12
            span = end - start
            beyond = pos[-(-end // pitch):]
            beyond -= start
            beyond %= span
            beyond += start
        else:
            np.minimum(pos, end - 1, out=pos)
        if self.table is not None:
            pos >>= 4
            return self.table[pos]
        return interpolate(self.ext, pos)


@lru_cache(maxsize=1)
def lfsr_states() -> np.ndarray:
    """The 32767 successive values of the 15-bit noise register, starting from its reset value 0x4000.

    Each step shifts right and feeds bit0 XOR bit1 into bit 14, so the register's bits are a window on the
    bit stream c[k+15] = c[k] ^ c[k+1] (polynomial x^15 + x + 1). Squaring that relation four times gives
    c[k+240] = c[k] ^ c[k+16], which extends the stream 224 bits per step.
    """
    first = [0] * 14 + [1]
    for k in range(240 - 15):
        first.append(first[k] ^ first[k + 1])
    bits = np.zeros(LFSR_PERIOD + 14 + 464, dtype=np.int32)
    bits[:240] = first
    for k in range(0, LFSR_PERIOD + 14, 224):
        bits[k + 240:k + 464] = bits[k:k + 224] ^ bits[k + 16:k + 240]
    weights = (1 << np.arange(15, dtype=np.int32))[::-1]  # register bit i holds stream bit k + i
    return np.convolve(bits[:LFSR_PERIOD + 14], weights, mode="valid").astype(np.int32)


NOISE_TILES = 4  # periods of the noise sequence kept end to end, so most notes read one contiguous slice


@lru_cache(maxsize=1)
def _noise_outputs() -> np.ndarray:
    """What a noise voice outputs for each register value in sequence (the register doubled, wrapped to 16
    bits), repeated NOISE_TILES times."""
    return np.tile(wrap16(lfsr_states() * 2), NOISE_TILES)


def noise_stream(clock_rate: int, start: int, n: int) -> np.ndarray:
    """A noise voice's output before the envelope for samples start..start+n of the render.

    The register steps on every tick of rate `clock_rate` (counted from the render's first sample), before
    the voices read it.
    """
    period = int(rate_periods()[clock_rate])
    table = _noise_outputs()
    if not period:
        return np.full(n, table[0], dtype=np.int32)
    first = (start + 1) % LFSR_PERIOD
    if period == 1 and first + n <= len(table):
        return table[first:first + n]
    steps = np.arange(start, start + n, dtype=np.int64)
    steps //= period
    steps += 1
    steps %= LFSR_PERIOD
    return table[steps]


# ------------------------------------------------------------------------------------------------ envelopes


@dataclass(frozen=True)
class Envelope:
    """A voice's envelope setting: ADSR registers, or a GAIN mode that replaces them, plus the release.

    ADSR: attack 0-15, decay 0-7, sustain_level 0-7 (decay stops near (SL+1)/8), sustain_rate 0-31
    (0 = hold). GAIN: ("direct", 0-127) holds that level; ("increase", rate) and ("bent", rate) rise
    linearly (bent slows above 3/4). release 0 is the hardware key-off (-8 per sample, about 8 ms from full);
    1-31 switches to GAIN exponential decrease at that rate at key-off, the softer fade drivers use.
    """

    attack: int = 15
    decay: int = 7
    sustain_level: int = 7
    sustain_rate: int = 0
    gain: tuple[str, int] | None = None
    release: int = 0


@lru_cache(maxsize=4096)
def exp_chain(start: int) -> np.ndarray:
    """Envelope values under repeated exponential-decrease steps (env -= 1; env -= env >> 8) from `start`
    down to 0 (inclusive).

    While (env - 1) >> 8 stays k, each step takes off exactly k + 1, so the chain is a run of arithmetic
    progressions, one per 256-wide band.
    """
    parts = []
    env = start
    while env > 0:
        k = (env - 1) >> 8
        run = np.arange(env, 256 * k, -(k + 1), dtype=np.int32)
        parts.append(run)
        env = int(run[-1]) - 1 - k
    parts.append(np.zeros(1, dtype=np.int32))
    return np.concatenate(parts)


@lru_cache(maxsize=1)
def _bent_chain() -> np.ndarray:
    """GAIN bent-line increase, tick by tick: +32 below 0x600, +8 from there, up to 0x7FF.

    (The chip decides the step from the previous sample's candidate value, which near the bend can make
    one or two ticks differ; the documented rule is used here.)
    """
    out = [0]
    while out[-1] < ENV_MAX:
        env = out[-1]
        out.append(min(env + (8 if env >= 0x600 else 32), ENV_MAX))
    return np.array(out, dtype=np.int32)


def _hold_states(env: Envelope, runs: np.ndarray) -> np.ndarray:
    """Envelope value after envelope run r (r = 0 is the run just before the voice's first audible sample)."""
    periods = rate_periods()
    if env.gain is not None:
        mode, value = env.gain
        if mode == "direct":
            return np.full(len(runs), value * 16, dtype=np.int32)
        p = int(periods[value])
        if mode == "increase":
            return np.minimum(32 * (runs // p + 1), ENV_MAX).astype(np.int32)
        chain = _bent_chain()
        return chain[np.minimum(runs // p + 1, len(chain) - 1)]
    pa = int(periods[2 * env.attack + 1])
    step = 1024 if env.attack == 15 else 32
    ticks = (ENV_MAX + 1) // step - 1  # attack ticks before the next step would overflow
    r_turn = (ticks - 1) * pa + 1  # the run that switches to decay
    e0 = ENV_MAX if r_turn % pa == 0 else ticks * step
    chain = exp_chain(e0)
    k_sus = int(np.argmax((chain[1:] >> 8) == env.sustain_level)) + 1
    pd = int(periods[2 * env.decay + 16])
    # the run that switches to sustain: right after the tick that reaches chain[k_sus - 1]
    r_sus = r_turn + 1 if k_sus == 1 else (r_turn // pd + 1) * pd + (k_sus - 2) * pd + 1
    k_dec = r_sus // pd - r_turn // pd
    ps = int(periods[env.sustain_rate])
    attack = step * (runs // pa + 1)
    decay_k = runs // pd - r_turn // pd
    sustain_k = k_dec + ((runs // ps - r_sus // ps) if ps else 0)
    k = np.where(runs <= r_sus, decay_k, sustain_k)
    out = np.where(runs < r_turn, attack, chain[np.clip(k, 0, len(chain) - 1)])
    return np.where(runs == r_turn, e0, out).astype(np.int32)


RELEASE_FLOOR = 32  # a GAIN release this low (1/64 of full) is finished with a key-off


@lru_cache(maxsize=4096)
def release_curve(rate: int, level: int) -> np.ndarray:
    """Envelope values, one per sample, from a key-off at `level` until silence (the final 0 left out).

    Rate 0 is the hardware key-off, -8 per sample. Rates 1-31 are a GAIN exponential decrease ticking at
    that rate (the first tick on the key-off sample), which a driver ends with a key-off once it has faded
    below RELEASE_FLOOR: the exponential's last stretch, 1 per tick, would hold the voice much longer.
    """
    fade = np.zeros(0, dtype=np.int32)
    if rate and level >= RELEASE_FLOOR:
        chain = exp_chain(level)
        below = int(np.argmax(chain < RELEASE_FLOOR))
        fade = np.repeat(chain[1:below], int(rate_periods()[rate]))
        level = int(chain[below])
    return np.concatenate((fade, np.arange(level - RELEASE_STEP, 0, -RELEASE_STEP, dtype=np.int32)))


class EnvelopeCurves:
    """Envelope curves for notes, sharing the key-held part of each envelope setting between notes."""

    def __init__(self) -> None:
        self._hold: dict[Envelope, np.ndarray] = {}

    def held(self, env: Envelope, n: int) -> np.ndarray:
        """Envelope values for the first n audible samples of a note that is still held."""
        cached = self._hold.get(env)
        if cached is None or len(cached) < n:
            size = max(n, 2 * len(cached) if cached is not None else 0)
            # int32 runs: the curve's divisions and selects take half as long as in int64 (a hold of
            # 2**31 samples would be 18 hours)
            cached = _hold_states(env, np.arange(size, dtype=np.int32))
            self._hold[env] = cached
        return cached[:n]

    def release_length(self, env: Envelope, level: int) -> int:
        """Samples that still sound after a key-off at `level` (the envelope is 0 from the next one)."""
        return len(release_curve(env.release, level))

    def apply(self, stream: np.ndarray, env: Envelope, hold: int) -> np.ndarray:
        """A note's output: the interpolated stream scaled by its envelope, (sample * env) >> 11 with bit 0
        cleared, for a note whose key-off takes effect at audible sample `hold`.

        Sample j is scaled by the envelope after run j; the run at the key-off sample is already a release
        run, so the release starts from the value after run hold - 1. The held and release parts multiply
        the stream where they are, without assembling the envelope first.
        """
        n = len(stream)
        out = np.zeros(n, dtype=np.int32)
        held = min(hold, n)
        np.multiply(stream[:held], self.held(env, held), out=out[:held])
        end = held
        if n > hold:
            release = release_curve(env.release, self.level_at(env, hold))
            end = hold + min(len(release), n - hold)
            np.multiply(stream[hold:end], release[:end - hold], out=out[hold:end])
        sounding = out[:end]  # zero after the release
        sounding >>= 11
        sounding &= ~1
        return out

    def level_at(self, env: Envelope, hold: int) -> int:
        """The envelope value a note has when its key-off takes effect (size `held` first when asking for
        many notes: the curve is computed up to the longest hold asked for)."""
        return int(self.held(env, hold)[hold - 1]) if hold > 0 else 0
