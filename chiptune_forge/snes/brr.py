"""BRR, the S-DSP's sample format: 9-byte blocks of 16 four-bit ADPCM samples, encoded and decoded bit-exactly.

Decoded samples are kept the way the DSP keeps them in its sample buffer: 16-bit values with bit 0 clear
(15-bit precision, "doubled"), which is what the Gaussian interpolator reads. Decoding follows the hardware
arithmetic (shift, one of four prediction filters done with floor shifts, clamp to 16 bits, wrap to 15 bits),
so a sample sounds here exactly as it would on the console.

The codec runs once per instrument on a few thousand samples (never on the output stream), so it is written
as plain sequential Python: the prediction filters are recursive and the wrap makes them non-linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BLOCK_BYTES = 9
BLOCK_SAMPLES = 16
MAX_SHIFT = 12  # shifts 13-15 are invalid on hardware (they decode as 0 / -2048)
END_FLAG = 0x01
LOOP_FLAG = 0x02
# Largest "real" (undoubled) sample value an encoder should aim for: doubling it must still fit 16 bits.
REAL_MAX = 16383


@dataclass(frozen=True)
class BrrSample:
    """An encoded sample: the raw BRR bytes plus the block the end block jumps back to (None = one-shot).

    The encoder runs the exact decoder on every block it writes, so it keeps what it decoded (`decoded`,
    which decode() then returns instead of decoding the bytes again); a sample made any other way, or
    copied with new data, has none.
    """

    data: bytes
    loop_block: int | None
    decoded: tuple[int, ...] | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self.data) // BLOCK_BYTES

    @property
    def loop_start(self) -> int | None:
        """First sample of the loop, or None for a one-shot sample."""
        return None if self.loop_block is None else self.loop_block * BLOCK_SAMPLES

    def headers(self) -> list[int]:
        return list(self.data[::BLOCK_BYTES])

    def decode(self) -> np.ndarray:
        """Every block decoded in order, as the DSP's 16-bit doubled values (int32 array)."""
        if self.decoded is not None:
            return np.array(self.decoded, dtype=np.int32)
        return decode_brr(self.data)


def _predict(filt: int, h1: int, h2: int) -> int:
    """The filter's prediction from the previous two decoded (doubled) samples h1 (newest) and h2.

    In real units the filters are p1*15/16, p1*61/32 - p2*15/16 and p1*115/64 - p2*13/16; the hardware
    computes them on the doubled newest sample and the halved older one with floor shifts, and the rounding
    of those shifts is part of the sound, so it is reproduced term by term.
    """
    if filt == 0:
        return 0
    if filt == 1:
        return (h1 >> 1) + ((-h1) >> 5)
    r2 = h2 >> 1
    if filt == 2:
        return h1 - r2 + (r2 >> 4) + ((-3 * h1) >> 6)
    return h1 - r2 + ((-13 * h1) >> 7) + ((3 * r2) >> 4)


def _decode_step(nibble: int, shift: int, prediction: int) -> int:
    """One decoded sample: the nibble shifted (shifts 13-15 give 0 or -2048), plus the prediction, clamped to
    16 bits, then doubled and wrapped to 16 bits as the DSP stores it."""
    s = prediction + (((nibble << shift) >> 1) if shift <= MAX_SHIFT else (-2048 if nibble < 0 else 0))
    s = 0x7FFF if s > 0x7FFF else (-0x8000 if s < -0x8000 else s)
    return ((s * 2 + 0x8000) & 0xFFFF) - 0x8000


def decode_brr(data: bytes) -> np.ndarray:
    """Decode BRR bytes block by block, exactly as the S-DSP does; returns doubled int16 values as int32."""
    if len(data) % BLOCK_BYTES:
        raise ValueError(f"BRR data length {len(data)} is not a multiple of {BLOCK_BYTES}")
    out = []
    h1 = h2 = 0
    for b in range(0, len(data), BLOCK_BYTES):
        header = data[b]
        shift, filt = header >> 4, (header >> 2) & 3
        for byte in data[b + 1:b + BLOCK_BYTES]:
            for nib in (byte >> 4, byte & 0x0F):
                h1, h2 = _decode_step(nib - 16 if nib >= 8 else nib, shift, _predict(filt, h1, h2)), h1
                out.append(h1)
    return np.array(out, dtype=np.int32)


# ------------------------------------------------------------------------------------------------ encoder


def _choose_parameters(target: np.ndarray, forced_zero: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pick a filter and shift per block from the ideal (unquantized) prediction, for all blocks at once.

    The exact encoding pass that follows may still raise a block's shift when quantization noise makes the
    real residual overflow the nibble range.
    """
    t = target.astype(np.float64)
    p1 = np.concatenate(([0.0], t[:-1]))
    p2 = np.concatenate(([0.0, 0.0], t[:-2]))
    preds = [np.zeros_like(t), p1 * 15 / 16, p1 * 61 / 32 - p2 * 15 / 16, p1 * 115 / 64 - p2 * 13 / 16]
    blocks = len(t) // BLOCK_SAMPLES
    peak = np.stack([np.abs(t - p).reshape(blocks, BLOCK_SAMPLES).max(axis=1) for p in preds], axis=1)
    # A nibble reaches +-7 * 2**(shift-1) (shift 0: +-3.5); pick the smallest shift that covers the residual.
    shift = np.clip(np.ceil(np.log2(np.maximum(peak, 1e-9) / 7.0)) + 1, 0, MAX_SHIFT).astype(np.int64)
    # Prefer the smallest shift, then the smallest residual peak; filter order breaks exact ties.
    score = shift * 1e9 + peak
    for b in forced_zero:
        score[b, 1:] = np.inf
    filt = np.argmin(score, axis=1)
    return filt, shift[np.arange(blocks), filt]


def _encode_block(target: list[int], filt: int, shift: int, h1: int, h2: int
                  ) -> tuple[list[int], int, bool, list[int]]:
    """Quantize one block with the exact decoder in the loop.

    Returns the nibbles, the squared error, whether any nibble had to be clipped to -8..7 (the shift was too
    small for the real residual), and the decoded samples (the last two are the decoder's state after it).
    """
    nibbles = []
    decoded = []
    err = 0
    clipped = False
    step = 1 << shift
    for want in target:
        pred = _predict(filt, h1, h2)
        # nibble n contributes (n << shift) >> 1 = n * step / 2: round 2 * residual / step to the nearest
        nib = (2 * (want - pred) + (step >> 1)) // step
        if not -8 <= nib <= 7:
            nib = -8 if nib < -8 else 7
            clipped = True
        got = _decode_step(nib, shift, pred)
        h1, h2 = got, h1
        err += (got - 2 * want) ** 2
        nibbles.append(nib & 0x0F)
        decoded.append(got)
    return nibbles, err, clipped, decoded


def encode_brr(samples: np.ndarray, loop_start: int | None = None) -> BrrSample:
    """Encode samples in [-1, 1] as BRR.

    `loop_start` (a multiple of 16) makes the last block jump back to that sample; its length must then be a
    multiple of 16 too. A one-shot sample is padded to whole blocks and followed by two silent blocks, the
    second carrying the end flag: the DSP stops a one-shot voice as soon as it starts decoding the end block,
    about 12 samples before playback gets there, so the padding keeps the whole sound audible.
    The first block and the loop block use filter 0, so no stale history leaks into the start and every pass
    through the loop decodes to the same samples.
    """
    x = np.asarray(samples, dtype=np.float64)
    if loop_start is not None:
        if loop_start % BLOCK_SAMPLES or len(x) % BLOCK_SAMPLES or not 0 <= loop_start < len(x):
            raise ValueError(f"loop start {loop_start} and length {len(x)} must be multiples of "
                             f"{BLOCK_SAMPLES} with the loop inside the sample")
    else:
        pad = (-len(x)) % BLOCK_SAMPLES + 2 * BLOCK_SAMPLES
        x = np.concatenate((x, np.zeros(pad)))
    target = np.clip(np.round(x * REAL_MAX), -REAL_MAX, REAL_MAX).astype(np.int64)
    blocks = len(target) // BLOCK_SAMPLES
    loop_block = None if loop_start is None else loop_start // BLOCK_SAMPLES
    forced = {0} if loop_block is None else {0, loop_block}
    filters, shifts = _choose_parameters(target, forced)
    out = bytearray()
    decoded: list[int] = []
    h1 = h2 = 0
    for b in range(blocks):
        want = target[b * BLOCK_SAMPLES:(b + 1) * BLOCK_SAMPLES].tolist()
        filt, shift = int(filters[b]), int(shifts[b])
        best = _encode_block(want, filt, shift, h1, h2)
        # Quantization noise in the history can push the real residual past the chosen shift: widen the
        # shift while nibbles clip, keeping whichever try decodes closest.
        trial, tried = best, shift
        while trial[2] and tried < MAX_SHIFT:
            tried += 1
            trial = _encode_block(want, filt, tried, h1, h2)
            if trial[1] < best[1]:
                best, shift = trial, tried
        nibbles, _, _, block = best
        decoded += block
        h1, h2 = block[-1], block[-2]
        flags = 0
        if b == blocks - 1:
            flags = END_FLAG | (LOOP_FLAG if loop_block is not None else 0)
        out.append((shift << 4) | (filt << 2) | flags)
        out.extend((nibbles[i] << 4) | nibbles[i + 1] for i in range(0, BLOCK_SAMPLES, 2))
    sample = BrrSample(bytes(out), loop_block)
    object.__setattr__(sample, "decoded", tuple(decoded))  # frozen: set once, as it is made
    return sample
