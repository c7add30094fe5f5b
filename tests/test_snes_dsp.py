"""The voice pipeline against per-sample reference models: Gaussian table, interpolation, pitch, envelopes,
noise."""

from __future__ import annotations

import numpy as np
import pytest

from chiptune_forge.snes.dsp import (
    ENV_MAX,
    LFSR_PERIOD,
    PITCH_MAX,
    Envelope,
    EnvelopeCurves,
    SampleSource,
    gaussian_table,
    interpolate,
    interpolation_table,
    lfsr_states,
    noise_stream,
    pitch_value,
    rate_periods,
)
from chiptune_forge.snes.instruments import brr_sample

# The rate table as the hardware documentation lists it (samples between ticks; rate 0 never ticks).
DOC_PERIODS = [0, 2048, 1536, 1280, 1024, 768, 640, 512, 384, 320, 256, 192, 160, 128, 96, 80, 64, 48, 40, 32,
               24, 20, 16, 12, 10, 8, 6, 5, 4, 3, 2, 1]


def test_rate_table_matches_the_documented_periods() -> None:
    assert rate_periods().tolist() == DOC_PERIODS


def test_gaussian_table_shape_and_phase_sums() -> None:
    g = gaussian_table().astype(int)
    assert len(g) == 512
    assert g[0] == 0 and g[511] == 1305 and g.max() == 1305
    assert np.all(np.diff(g) >= 0)  # rises monotonically
    f = np.arange(256)
    sums = g[255 - f] + g[511 - f] + g[256 + f] + g[f]
    assert np.all(np.abs(sums - 2048) <= 2)  # unity gain after >> 11, at every phase


def reference_interpolate(ext: np.ndarray, pos: int) -> int:
    """The documented per-sample formula, in plain Python."""
    g = [int(x) for x in gaussian_table()]
    i, f = pos >> 12, (pos >> 4) & 0xFF
    s = [int(ext[i + k]) for k in range(4)]
    out = (g[255 - f] * s[0] >> 11) + (g[511 - f] * s[1] >> 11) + (g[256 + f] * s[2] >> 11)
    out = ((out + 0x8000) & 0xFFFF) - 0x8000
    out += g[f] * s[3] >> 11
    return max(-0x8000, min(0x7FFF, out)) & ~1


def test_interpolation_matches_the_reference_formula() -> None:
    rng = np.random.default_rng(1)
    ext = (rng.integers(-16384, 16384, 300) * 2).astype(np.int32)
    pos = rng.integers(0, 290 << 12, 500)
    got = interpolate(ext, pos.astype(np.int64))
    assert got.tolist() == [reference_interpolate(ext, int(p)) for p in pos]


def test_interpolating_a_constant_gives_the_constant() -> None:
    ext = np.full(40, 10000, dtype=np.int32)
    out = interpolate(ext, np.arange(0, 30 << 12, 37, dtype=np.int64))
    assert np.all(np.abs(out - 10000) <= 16)


@pytest.mark.parametrize("name", ["pulse50", "pluck", "kick"])
def test_streams_follow_the_position_counter_through_the_loop(name: str) -> None:
    brr = brr_sample(name)
    decoded = brr.decode()
    source = SampleSource(decoded, brr.loop_start, brr.num_blocks)
    pitch = 0x1234
    n = 3000
    # what the DSP plays: the sample, then the loop over and over (or silence after a one-shot)
    if brr.loop_start is None:
        played = np.concatenate((decoded, np.zeros(n * 2, dtype=np.int32)))
    else:
        reps = (n * pitch >> 12) // (len(decoded) - brr.loop_start) + 2
        played = np.concatenate([decoded] + [decoded[brr.loop_start:]] * reps)
    expected = [reference_interpolate(played, j * pitch) for j in range(n)]
    got = source.stream(pitch, n)
    if brr.loop_start is None:  # past the end the voice is silenced; compare the audible part
        # The decoder runs 12 samples ahead of playback and silences the voice as it reaches the end block.
        end_block = (brr.num_blocks - 1) * 16
        n = next(j for j in range(1, 1 << 20) if (j * pitch >> 12) + 12 >= end_block)
        assert source.audible_samples(pitch) == n
    assert got[:n].tolist() == expected[:n]


def test_pitch_value_is_14_bits_with_0x1000_at_32_khz() -> None:
    assert pitch_value(1.0) == 0x1000
    assert pitch_value(0.5) == 0x800
    assert pitch_value(10.0) == PITCH_MAX
    assert pitch_value(440 / 500) == round(4096 * 0.88)


# ------------------------------------------------------------------------------------------------ envelopes


def reference_envelope(env: Envelope, runs: int) -> list[int]:
    """The chip's envelope, one run per sample: a candidate value every sample, committed on the rate's
    ticks (here counted from the first run); the attack ends when the candidate passes 0x7FF, the decay
    when the candidate's top three bits equal the sustain level."""
    level, mode, out = 0, "attack", []
    for r in range(runs):
        if env.gain is not None:
            kind, value = env.gain
            if kind == "direct":
                cand, rate = value * 16, 31
            else:
                cand, rate = level + (8 if kind == "bent" and level >= 0x600 else 32), value
        elif mode == "attack":
            rate = 2 * env.attack + 1
            cand = level + (1024 if rate == 31 else 32)
        else:
            cand = level - 1
            cand -= cand >> 8
            rate = 2 * env.decay + 16 if mode == "decay" else env.sustain_rate
            if mode == "decay" and cand >> 8 == env.sustain_level:
                mode = "sustain"
        if cand > ENV_MAX or cand < 0:
            cand = ENV_MAX if cand > 0 else 0
            if mode == "attack":
                mode = "decay"
        period = DOC_PERIODS[rate]
        if period and r % period == 0:
            level = cand
        out.append(level)
    return out


@pytest.mark.parametrize("env", [
    Envelope(15, 7, 7, 0), Envelope(15, 5, 6, 12), Envelope(15, 2, 2, 16), Envelope(10, 3, 6, 8),
    Envelope(9, 2, 6, 6), Envelope(14, 4, 0, 31), Envelope(12, 0, 3, 1), Envelope(15, 7, 0, 24),
    Envelope(15, 7, 3, 0),
    Envelope(gain=("direct", 100)), Envelope(gain=("increase", 20)), Envelope(gain=("bent", 18)),
])
def test_held_envelope_matches_the_per_sample_model(env: Envelope) -> None:
    n = 60000
    assert EnvelopeCurves().held(env, n).tolist() == reference_envelope(env, n)


def test_attack_15_is_instant_and_sustain_settles_at_its_level() -> None:
    curve = EnvelopeCurves().held(Envelope(15, 7, 3, 0), 40000)
    assert curve[:2].tolist() == [1024, ENV_MAX]
    # the decay stops as its next step would enter SL's band: at about (SL + 1) / 8 of full; SR 0 holds it
    assert abs(int(curve[-1]) - 4 * 256) <= 16 and curve[-1] == curve[-5000]


def test_key_off_releases_8_per_sample_to_zero() -> None:
    curves = EnvelopeCurves()
    env = Envelope(15, 7, 7, 0)
    note = curves.apply(np.full(400, 4096, dtype=np.int32), env, 100) // 2  # 4096 * env >> 11: 2 * env
    level = int(note[99])
    assert note[100:110].tolist() == [level - 8 * k for k in range(1, 11)]
    assert note[99 + -(-level // 8)] == 0 and np.all(note[100 + level // 8:] == 0)
    assert curves.release_length(env, level) == (level - 1) // 8  # sounding samples after the key-off


def test_gain_release_fades_exponentially_then_keys_off() -> None:
    curves = EnvelopeCurves()
    env = Envelope(15, 7, 7, 0, release=24)  # rate 24: a step every 10 samples
    note = curves.apply(np.full(20000, 4096, dtype=np.int32), env, 50) // 2
    level = int(note[49])
    fade = note[50:]
    expected, value = [], level
    while value >= 32:  # exponential steps (env -= 1; env -= env >> 8) until below 1/64 of full
        value -= 1
        value -= value >> 8
        expected += [value] * 10 if value >= 32 else []
    assert fade[:len(expected)].tolist() == expected
    rest = fade[len(expected):]
    assert rest[0] == value - 8 and np.all(np.diff(rest[:value // 8]) == -8) and rest[-1] == 0
    assert curves.release_length(env, level) == len(expected) + (value - 1) // 8


# ---------------------------------------------------------------------------------------------------- noise


def test_noise_register_runs_through_its_full_period() -> None:
    states = lfsr_states()
    assert len(states) == LFSR_PERIOD == len(np.unique(states))
    s = 0x4000
    for k in range(200):
        assert states[k] == s
        s = (s >> 1) | (((s ^ (s >> 1)) & 1) << 14)  # new bit 14 = bit 0 xor bit 1


def test_noise_voice_outputs_the_register_doubled_and_steps_at_the_clock_rate() -> None:
    states = lfsr_states().astype(np.int64)
    out = noise_stream(29, 100, 12)  # rate 29: a step every 3 samples
    steps = (np.arange(100, 112) // 3 + 1) % LFSR_PERIOD
    assert out.tolist() == (((states[steps] * 2 + 0x8000) & 0xFFFF) - 0x8000).tolist()
    fast = noise_stream(31, 5, 40000)  # one step per sample, across the register's wrap-around
    assert LFSR_PERIOD < 40000
    steps = (np.arange(5, 40005) + 1) % LFSR_PERIOD
    assert fast.tolist() == (((states[steps] * 2 + 0x8000) & 0xFFFF) - 0x8000).tolist()


def test_the_interpolation_table_is_the_interpolator_at_every_position() -> None:
    rng = np.random.default_rng(5)
    ext = rng.integers(-0x8000, 0x8000, 64 + 3).astype(np.int32) & ~1
    ext[:8] = [0x7FFE, 0x7FFE, 0x7FFE, 0x7FFE, -0x8000, -0x8000, -0x8000, -0x8000]  # sums that wrap and clamp
    table = interpolation_table(ext, 64)
    assert table.dtype == np.int32
    assert np.array_equal(table, interpolate(ext, np.arange(64 * 256, dtype=np.int64) << 4))
