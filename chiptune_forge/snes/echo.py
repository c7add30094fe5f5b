"""The DSP's output stage: the main and echo buses, the echo unit (delay, 8-tap FIR, feedback) and volumes.

Voices add into two buses: `dry` (main output only) and `wet` (main output and echo input: the EON voices).
The echo is recursive (what is written now is read back EDL x 512 samples later and fed back), but every
sample of a block of up to that many samples depends only on samples written before the block, so it runs
one delay-length block at a time with exact integer arithmetic; the echo bus keeps the last delay's worth
of what was written as the history the next block reads. Voice sums are clamped once per sample
rather than after each voice is added (the chip clamps the running sum; the two differ only when a partial
sum overflows and a later voice pulls it back). EDL 0 (a one-sample echo loop) is not offered: the shortest
echo is EDL 1, 16 ms.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..workers import can_run_ahead, run_ahead, shared_array
from .dsp import DSP_RATE

FRAMES_PER_EDL = 512  # 2 KiB of echo RAM per EDL step, 4 bytes per stereo frame: 16 ms
MAX_EDL = 15
FIR_TAPS = 8
MAX_TAIL_SECONDS = 10.0
WINDOW = 32768  # frames mixed at a time (a whole number of echo delays when there is echo)
SCALE = np.float32(1 / 32768)
AHEAD = 3  # windows the voices may run ahead of the output stage in parallel


@dataclass(frozen=True)
class EchoSettings:
    """Echo registers: EDL (1-15, x 16 ms), EFB feedback, FIR c0..c7 (c0 weights the oldest sample), EVOL."""

    edl: int
    feedback: int
    fir: tuple[int, ...]
    volume: tuple[int, int]

    @property
    def delay(self) -> int:
        """The echo delay in samples."""
        return self.edl * FRAMES_PER_EDL

    @property
    def history(self) -> int:
        """Samples before the current one that the echo may read: the delay plus the FIR's 7 older taps."""
        return self.delay + FIR_TAPS - 1

    def tail_frames(self) -> int:
        """How long the echo keeps sounding after its input stops, until it drops below one LSB.

        The loop gain per pass is at most |EFB|/128 times the FIR's summed |c|/128; a loop that does not
        decay is cut at MAX_TAIL_SECONDS.
        """
        if self.volume == (0, 0):
            return 0
        gain = abs(self.feedback) / 128 * sum(abs(c) for c in self.fir) / 128
        if gain >= 1.0:
            return int(MAX_TAIL_SECONDS * DSP_RATE)
        passes = 1 if gain == 0 else math.ceil(math.log(32768) / -math.log(gain))
        return min((passes + 1) * self.delay + FIR_TAPS, int(MAX_TAIL_SECONDS * DSP_RATE))


Signal = Callable[[], tuple[np.ndarray, np.ndarray]]
"""Makes a stereo signal (left, right: 16-bit-scale integer arrays) when the mix reaches it."""


class Mixer:
    """Mixes scheduled stereo signals through the main and echo buses, a window of samples at a time.

    Each signal (a sampler note, or a stem rendered by other means) is scheduled with its start and end and
    made only when the mix reaches its start, and dropped once past its end, so only the voices sounding
    now are held. The buses cover one window (a whole number of echo delays, around a second), one row per
    channel, so every addition and every step of the output stage works on contiguous data in cache.
    blocks() hands the output on a window at a time; output() gathers it into one float array.
    """

    def __init__(self, frames: int, echo: EchoSettings | None) -> None:
        self.frames = frames
        self.echo = echo
        self.clipped = 0  # channel samples the output stage clamped to 16 bits (the voices' sum, the output or both)
        self._items: list[tuple[int, int, bool, Signal]] = []

    def add(self, start: int, end: int, echo: bool, signal: Signal) -> None:
        """Schedule a signal for samples [start, end); `echo` routes it to the echo input too (EON)."""
        if end > start and start < self.frames:
            self._items.append((start, end, echo, signal))

    def output(self, master: tuple[int, int], parallel: bool = False) -> np.ndarray:
        """The DSP's final output as float32 (frames, 2) in [-1, 1): main x MVOL plus echo x EVOL, clamped
        to 16 bits, divided by 32768."""
        audio = np.empty((self.frames, 2), dtype=np.float32)
        b = 0
        for block in self.blocks(master, parallel):
            to_float(block, audio[b:b + block.shape[1]])
            b += block.shape[1]
        return audio

    def blocks(self, master: tuple[int, int], parallel: bool = False) -> Iterator[np.ndarray]:
        """The DSP's final output a window at a time, in order: int32 (2, n) 16-bit values (what output()
        divides by 32768), each valid only until the next is asked for. The mixer holds nothing the size of the
        piece (only a stem scheduled on it is whole), so a consumer that writes blocks out as they come
        renders in memory that does not grow with the piece.

        The mix has two halves: the voices summed into the main and echo buses, and the output stage (the
        echo unit, volumes, clamps). With `parallel`, where it gains something (workers.can_run_ahead),
        the voices run in a second process a few windows ahead of the output stage; the samples are the
        same either way.
        """
        echo = self.echo if any(item[2] for item in self._items) else None
        if echo is not None and echo.volume == (0, 0):
            echo = None
        step = echo.delay if echo is not None else WINDOW
        window = step * max(1, WINDOW // step)
        buses = np.zeros((1, 2, 2, window), dtype=np.int32)
        if parallel and can_run_ahead():
            with contextlib.suppress(OSError):  # no shared memory to be had: mix here
                buses = shared_array((AHEAD, 2, 2, window), np.int32)
        sizes = self._buses(buses, echo is not None)
        if len(buses) > 1:
            sizes = run_ahead(sizes, len(buses))
        with contextlib.closing(sizes):  # an error here stops the voices' side at once
            yield from self._output_stage(buses, sizes, echo, master)

    def _output_stage(self, buses: np.ndarray, sizes: Iterator[int], echo: EchoSettings | None,
                      master: tuple[int, int]) -> Iterator[np.ndarray]:
        """The echo unit, volumes and clamps over each window of buses, as `sizes` says it is ready."""
        window = buses.shape[-1]
        step = echo.delay if echo is not None else window
        pad = echo.history if echo is not None else 0
        wet = np.zeros((2, pad + window), dtype=np.int32)  # echo history, then this window's echo input
        echo_out = np.zeros((2, window), dtype=np.int32)
        fir_step = _FirStep(echo, wet, echo_out) if echo is not None else None
        clamp = _Clamp(window)
        for k, n in enumerate(sizes):
            main, sent = buses[k % len(buses), :, :, :n]
            if fir_step is not None:
                wet[:, pad:pad + n] = sent
                main += sent
            clipped = clamp.counting(main)  # the voices' sum, then MVOL
            _scale(main, master, 7)
            if fir_step is not None:  # the echo, a delay at a time, then EVOL and the output clamp
                for j in range(0, n, step):
                    fir_step(j, min(j + step, n))
                _scale(echo_out[:, :n], echo.volume, 7)
                main += echo_out[:, :n]
                clipped = clamp.counting(main, clipped)
            if clipped is not None:
                self.clipped += int(np.count_nonzero(clipped))
            yield main
            buses[k % len(buses), :, :, :n] = 0  # cleared for a later window here, where there is time to spare
            if pad:
                wet[:, :pad] = wet[:, n:n + pad].copy()  # the echo history the next window reads

    def _buses(self, buses: np.ndarray, echo: bool) -> Iterator[int]:
        """Sum the signals into the main and echo buses (the echo's only when `echo`), a window at a time:
        window k into buses[k % len(buses)] (main, echo) x (left, right), which must be zero, yielding its
        length."""
        window = buses.shape[-1]
        items = sorted(self._items, key=lambda item: item[0])
        active: list[tuple[int, int, bool, np.ndarray, np.ndarray]] = []
        nxt = 0
        for k, b in enumerate(range(0, self.frames, window)):
            e = min(b + window, self.frames)
            n = e - b
            out = buses[k % len(buses)]  # zeroed by the output stage once it is done with it
            while nxt < len(items) and items[nxt][0] < e:
                start, end, sends, signal = items[nxt]
                left, right = signal()
                active.append((start, min(end, start + len(left)), sends, left, right))
                nxt += 1
            for start, end, sends, left, right in active:
                lo, hi = max(start, b), min(end, e)
                if hi > lo:
                    bus = out[1 if sends and echo else 0]
                    bus[0, lo - b:hi - b] += left[lo - start:hi - start]
                    bus[1, lo - b:hi - b] += right[lo - start:hi - start]
            active = [a for a in active if a[1] > e]
            yield n


def to_float(block: np.ndarray, out: np.ndarray) -> np.ndarray:
    """A (2, n) block of 16-bit values as float32 frames (n, 2) in [-1, 1), written into `out`."""
    out[:, 0] = block[0]
    out[:, 1] = block[1]
    out *= SCALE
    return out


class _Clamp:
    """Clamp to signed 16 bits in place, against bound arrays made once per block size (numpy's minimum
    and maximum run several times faster against an array than against a scalar)."""

    def __init__(self, frames: int) -> None:
        self.lo = np.full((2, frames), -0x8000, dtype=np.int32)
        self.hi = np.full((2, frames), 0x7FFF, dtype=np.int32)

    def __call__(self, x: np.ndarray) -> None:
        n = x.shape[1]
        np.minimum(x, self.hi[:, :n], out=x)
        np.maximum(x, self.lo[:, :n], out=x)

    def counting(self, x: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray | None:
        """Clamp x in place; returns where it left the 16-bit range, joined with where an earlier clamp
        `seen` did (None: nowhere). The usual window is in range, found by two reductions, and not touched."""
        if x.max() <= 0x7FFF and x.min() >= -0x8000:
            return seen
        where = (x > 0x7FFF) | (x < -0x8000)
        self(x)
        return where if seen is None else where | seen


def _scale(x: np.ndarray, volume: tuple[int, int], shift: int) -> None:
    """x = (x * volume) >> shift per channel, in place (one scalar multiply when both sides are equal)."""
    if volume[0] == volume[1]:
        x *= volume[0]
    else:
        x[0] *= volume[0]
        x[1] *= volume[1]
    x >>= shift


class _FirStep:
    """One block of the echo unit: FIR over the echo history (the echo output before EVOL, which the mixer
    applies to a whole window at once), feedback write.

    The echo bus holds, at pad + n, the echo input of sample n; once sample n is done it holds what the DSP
    wrote to echo RAM at n, already halved as the FIR reads it back at n + delay (the written value has
    bit 0 clear, so halving loses nothing). A block is at most one delay long, so everything it reads was
    written by earlier blocks.

    A block is a dozen numpy operations on a few thousand samples, and a piece has a block every
    16-240 ms, so Python's share counts: each position in the window gets, once, the list of operations
    its block runs, with their views and scalars bound (the buffers are reused window after window); a
    power-of-two coefficient 2**j is a shift, (h * 2**j) >> 6 == h >> (6 - j), and a coefficient of 64
    adds the history itself.
    """

    def __init__(self, echo: EchoSettings, wet: np.ndarray, out: np.ndarray) -> None:
        """`wet` is the mixer's echo bus (history, then the window), `out` its (2, window) FIR output."""
        self.echo = echo
        self.wet, self.out = wet, out
        self.taps = [(i, c, _tap_shift(c)) for i, c in enumerate(echo.fir) if c]
        # The chip wraps the sum of taps 0-6 to 16 bits, casts tap 7 to 16 bits and clamps the total; with
        # sum(|c|) <= 128 none of these can change a value (|history| <= 16384), so they are skipped.
        self.overflow = sum(abs(c) for c in echo.fir) > 128
        self.clamp = _Clamp(echo.delay)
        self.work = np.zeros((2, echo.delay), dtype=np.int32)
        self.plans: dict[tuple[int, int], list[tuple[np.ufunc, tuple, np.ndarray]]] = {}

    def _plan(self, b: int, e: int) -> list[tuple[np.ufunc, tuple, np.ndarray]]:
        """The operations, each (ufunc, inputs, output), of the block at window samples b..e."""
        n, start = e - b, self.echo.history
        fir, work, sent = self.out[:, b:e], self.work[:, :n], self.wet[:, start + b:start + e]
        lo, hi = self.clamp.lo[:, :n], self.clamp.hi[:, :n]
        ops: list[tuple[np.ufunc, tuple, np.ndarray]] = []

        def wrap(x: np.ndarray) -> None:  # to signed 16 bits, as a C cast to int16_t
            ops.extend([(np.add, (x, 0x8000), x), (np.bitwise_and, (x, 0xFFFF), x), (np.subtract, (x, 0x8000), x)])

        def tap(target: np.ndarray, h: np.ndarray, c: int, shift: int | None) -> None:  # (h * c) >> 6
            if shift is None:
                ops.extend([(np.multiply, (h, c), target), (np.right_shift, (target, 6), target)])
            else:
                ops.append((np.right_shift, (h, shift), target))

        # (tap index, coefficient, shift, history view); tap 7 of an overflowing FIR wraps on its own
        taps = [(i, c, shift, self.wet[:, b + i:b + i + n]) for i, c, shift in self.taps]
        plain = [shift == 0 and not (self.overflow and i == FIR_TAPS - 1) for i, _, shift, _ in taps]
        if not taps:
            ops.append((np.multiply, (fir, 0), fir))
        elif len(taps) > 1 and plain[0] and plain[1]:
            ops.append((np.add, (taps[0][3], taps[1][3]), fir))  # two histories summed in one step
            taps, plain = taps[1:], plain[1:]  # (the second is done; the loop skips index 0)
        else:
            _, c, shift, h = taps[0]
            tap(fir, h, c, shift)  # the first tap is written straight into the sum
            if self.overflow and taps[0][0] == FIR_TAPS - 1:
                wrap(fir)
        for (i, c, shift, h), simple in zip(taps[1:], plain[1:], strict=True):
            if self.overflow and i == FIR_TAPS - 1:  # taps 0-6 wrap as a sum, tap 7 on its own
                wrap(fir)
                tap(work, h, c, shift)
                wrap(work)
                ops.append((np.add, (fir, work), fir))
            elif simple:
                ops.append((np.add, (fir, h), fir))
            else:
                tap(work, h, c, shift)
                ops.append((np.add, (fir, work), fir))
        if self.overflow:
            if self.echo.fir[-1] == 0:
                wrap(fir)
            ops.extend([(np.minimum, (fir, hi), fir), (np.maximum, (fir, lo), fir)])
        ops.append((np.bitwise_and, (fir, ~1), fir))
        if self.echo.feedback:
            ops.extend([(np.multiply, (fir, self.echo.feedback), work), (np.right_shift, (work, 7), work),
                        (np.add, (sent, work), sent)])
        ops.extend([(np.minimum, (sent, hi), sent), (np.maximum, (sent, lo), sent), (np.right_shift, (sent, 1), sent)])
        return ops

    def __call__(self, b: int, e: int) -> None:
        """Echo for window samples b..e: writes the FIR output to out[:, b:e] and the echo buffer."""
        plan = self.plans.get((b, e))
        if plan is None:
            plan = self.plans[(b, e)] = self._plan(b, e)
        for ufunc, inputs, out in plan:
            ufunc(*inputs, out=out)


def _tap_shift(c: int) -> int | None:
    """The right shift equal to (h * c) >> 6 for a coefficient c = 2**j up to 64, else None."""
    if 0 < c <= 64 and not c & (c - 1):
        return 6 - c.bit_length() + 1
    return None
