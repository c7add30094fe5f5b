"""BRR: block layout, the four prediction filters, shift and wrap rules, and encoder accuracy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chiptune_forge.snes.brr import BLOCK_BYTES, BLOCK_SAMPLES, REAL_MAX, decode_brr, encode_brr


def block(shift: int, filt: int, nibbles: list[int], flags: int = 0) -> bytes:
    """One hand-made BRR block: header SSSSFFLE, then 16 signed nibbles, high nibble first."""
    assert len(nibbles) == 16
    data = bytes([(shift << 4) | (filt << 2) | flags])
    return data + bytes(((a & 15) << 4) | (b & 15) for a, b in zip(nibbles[::2], nibbles[1::2], strict=True))


def real(decoded: np.ndarray) -> np.ndarray:
    """Decoded values are stored doubled (15-bit precision); this is the sample in "real" units."""
    return decoded >> 1


def test_block_layout_of_a_looped_sample() -> None:
    wave = np.sin(2 * np.pi * np.arange(64) / 64) * 0.5
    brr = encode_brr(wave, loop_start=0)
    assert len(brr.data) == 4 * BLOCK_BYTES
    headers = brr.headers()
    assert [h & 3 for h in headers] == [0, 0, 0, 3]  # end + loop flags on the last block only
    assert (headers[0] >> 2) & 3 == 0  # the first block (here also the loop block) uses filter 0
    assert all(h >> 4 <= 12 for h in headers)
    assert brr.loop_start == 0 and brr.num_blocks == 4


def test_one_shot_is_padded_with_a_silent_end_block() -> None:
    brr = encode_brr(np.full(40, 0.3))
    assert brr.loop_block is None
    assert brr.num_blocks == 5  # 40 samples -> 3 blocks, then a silent block and the end block
    assert [h & 3 for h in brr.headers()] == [0, 0, 0, 0, 1]
    assert np.all(brr.decode()[-2 * BLOCK_SAMPLES:] == 0)


def test_loop_start_must_be_on_a_block_boundary() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        encode_brr(np.zeros(64), loop_start=8)


def test_nibbles_are_high_first_and_shifted() -> None:
    nibbles = [1, 2, -1, -8, 7, 0, 3, -3] * 2
    out = decode_brr(block(4, 0, nibbles))
    assert real(out).tolist() == [(n << 4) >> 1 for n in nibbles]


def test_shift_zero_halves_and_invalid_shifts_give_0_or_minus_2048() -> None:
    nibbles = [3, -3, 7, -8] * 4
    assert real(decode_brr(block(0, 0, nibbles))).tolist() == [n >> 1 for n in nibbles]
    for shift in (13, 14, 15):
        assert real(decode_brr(block(shift, 0, nibbles))).tolist() == [0 if n >= 0 else -2048 for n in nibbles]


@pytest.mark.parametrize(("filt", "c1", "c2"), [(1, 15 / 16, 0.0), (2, 61 / 32, -15 / 16), (3, 115 / 64, -13 / 16)])
def test_each_filter_predicts_from_the_two_previous_samples(filt: int, c1: float, c2: float) -> None:
    # history from a filter-0 block, then a block of zero nibbles: its samples are pure prediction
    history = [0] * 12 + [5, -3, 6, 4]
    data = block(9, 0, history) + block(0, filt, [0] * 16)
    out = real(decode_brr(data)).astype(float)
    for k in range(16, 32):
        expected = c1 * out[k - 1] + c2 * out[k - 2]
        assert abs(out[k] - expected) <= 2.0, (k, out[k], expected)  # floor shifts: within a couple of LSBs
    assert out[31] != 0  # the recursion really carried the history


def test_decoding_wraps_to_15_bits_after_clamping() -> None:
    # p1 = 14336 (real), p2 = 0. Filter 1 predicts 13440, the nibble adds 14336: 27776 fits 16 bits but
    # not 15, so the stored (doubled) sample wraps negative.
    data = block(12, 0, [0] * 15 + [7]) + block(12, 1, [7] + [0] * 15)
    out = decode_brr(data)
    assert out[15] == 2 * 14336
    assert out[16] == 2 * 27776 - 65536
    # Filter 2 predicts about 27328 from the same history; + 14336 passes 32767 and clamps first: 2 * 32767
    # wraps to -2 (without the clamp it would have been 2 * 41664 - 65536 = 17792).
    data = block(12, 0, [0] * 15 + [7]) + block(12, 2, [7] + [0] * 15)
    assert decode_brr(data)[16] == -2


def test_every_pass_through_the_loop_decodes_the_same() -> None:
    t = np.arange(160)
    wave = 0.6 * np.sin(2 * np.pi * t / 32) * np.minimum(1.0, t / 64)
    brr = encode_brr(wave, loop_start=96)
    loop = brr.data[brr.loop_block * BLOCK_BYTES:]
    played = decode_brr(brr.data + loop + loop)  # what the DSP decodes when it jumps back twice
    body = played[96:160]
    assert np.array_equal(played[160:224], body) and np.array_equal(played[224:288], body)


def test_sine_round_trip_error_is_small() -> None:
    t = np.arange(4096)
    wave = 0.7 * np.sin(2 * np.pi * 440 * t / 32000)
    decoded = encode_brr(wave).decode()[:len(t)] / (2 * REAL_MAX)
    err = decoded - wave
    snr = 10 * np.log10(np.mean(wave**2) / np.mean(err**2))
    assert snr > 45.0
    # The first block must use filter 0 (coarse at this level) and the next inherits its history; from
    # then on the error stays within a fraction of a percent of full scale.
    assert np.max(np.abs(err[2 * BLOCK_SAMPLES:])) < 0.005


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-0.9, 0.9), min_size=3, max_size=3), st.integers(8, 200))
def test_smooth_signals_never_wrap(amps: list[float], period: int) -> None:
    t = np.arange(512)
    wave = sum(a * np.sin(2 * np.pi * (k + 1) * t / period) for k, a in enumerate(amps)) / 3
    decoded = encode_brr(wave).decode()[:len(t)] / (2 * REAL_MAX)
    assert np.max(np.abs(decoded - wave)) < 0.1


@pytest.mark.parametrize("loop", [None, 0, 32])
def test_what_the_encoder_decoded_is_what_the_bytes_decode_to(loop: int | None) -> None:
    rng = np.random.default_rng(11)
    wave = np.clip(np.cumsum(rng.normal(0, 0.08, 96)) * 0.3, -1, 1)  # wide swings: shifts get raised
    brr = encode_brr(wave, loop_start=loop)
    assert brr.decoded is not None and np.array_equal(brr.decode(), decode_brr(brr.data))
    assert dataclasses.replace(brr, data=brr.data[:9]).decoded is None  # a copy with new data decodes it
