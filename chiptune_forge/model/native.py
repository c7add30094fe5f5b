"""Training's native kernels, built with the machine's C++ compiler: the LSTM layers' recurrent loops
(lstm_loops.cc) and the output layer with its masked cross-entropy (output_loss.cc).

TensorFlow runs a recurrent loop one small kernel at a time, and at these sizes the kernels' fixed costs
outweigh their arithmetic; the native loops do a step in one pass (about 1.5x faster per step of a loop),
and also make the layer's input products, its dropout and its inputs' gradient while the data is in cache.
The output layer's logits are the largest tensor of a step, and TensorFlow takes them and their gradient
through memory several times; the native output layer keeps them in cache, a block of rows at a time.
Together they make a training step about 1.4x faster (bench/train_speed.py). They are
compiled on first use for the CPU they run on (`-march=native`) and cached under
`$XDG_CACHE_HOME/chiptune-forge` (default `~/.cache/chiptune-forge`), keyed by the source, the compiler and
the CPU, so a cache shared between different machines never runs code built for another CPU. Where no
compiler is found (`CXX`, else `c++`, `g++` or `clang++` on PATH) or the build fails, training uses
TensorFlow's loops and says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import weakref
from functools import cache
from pathlib import Path

import numpy as np

SOURCES = tuple(Path(__file__).with_name(name) for name in ("kernels.h", "lstm_loops.cc", "output_loss.cc"))
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-pthread")
UNIT_MULTIPLE = 16  # the loops take layers whose size is a multiple of this
BUILD_TIMEOUT_S = 600
_ALIGN = 64  # bytes; the loops stream their records past the caches when arrays are 32-byte aligned


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chiptune-forge"


def find_compiler() -> str | None:
    """The compiler command: `CXX` (which may hold arguments, as in "ccache g++"), else the first C++
    compiler on PATH."""
    return os.environ.get("CXX") or next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keys = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in keys}))


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Buffers:
    """Recycled memory for the loops' outputs. A fresh array of tens of MB is mapped by the system as new
    zeroed pages, and faulting them in on every call costs as much as the loops save; these buffers go back
    to a free list when the arrays made from them are released (by TensorFlow, once it is done with the
    tensors that share their memory) and are handed out again. A free buffer that has not been taken for
    the last AGE takes (a few training steps) is dropped, so memory follows the batches now in use."""

    AGE = 64

    def __init__(self) -> None:
        self._free: list[tuple[np.ndarray, int]] = []  # (buffer, the take count when it was freed)
        self._takes = 0
        self._lock = threading.Lock()
        self._stagger = itertools.count()

    def _take(self, size: int) -> np.ndarray:
        with self._lock:
            self._takes += 1
            self._free = [(b, freed) for b, freed in self._free if self._takes - freed <= self.AGE]
            fits = [i for i, (b, _) in enumerate(self._free) if b.size >= size]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i][0].size))[0]
        return np.empty(size, dtype=np.float32)

    def _give_back(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free.append((buffer, self._takes))

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised float32 array that starts 64-byte aligned, at one of 63 offsets within 4 KiB: the
        loops read and write several arrays at the same position at once, and arrays that all start on a
        page boundary would put those accesses in the same cache sets."""
        size = int(np.prod(shape))
        raw = self._take(size + 16 * 64)
        skip = (-raw.ctypes.data % _ALIGN) // 4 + 16 * (17 * next(self._stagger) % 63)
        return raw[skip:skip + size].reshape(shape)

    def release(self, buffer: np.ndarray) -> None:
        """Returns `buffer` (from `empty`, used only inside a call) to the free list at once."""
        self._give_back(buffer.base)

    def hand_out(self, array: np.ndarray) -> None:
        """Returns the memory of `array` (from `empty`) to the free list once the array has been released
        (by TensorFlow, once it is done with the tensor that shares its memory). A view of a view refers to
        the memory's owner, not to the view it was made from, so only the array handed out can tell when
        the memory is free again: a caller must not keep views of it beyond its own life."""
        weakref.finalize(array, self._give_back, array.base)


def check_units(units: int) -> None:
    """Refuses a layer size the loops cannot take (they read whole vectors of 16 units)."""
    if units % UNIT_MULTIPLE:
        raise ValueError(f"the native loops take layer sizes that are multiples of {UNIT_MULTIPLE}, not {units}")


def _given(array: np.ndarray | None, dtype: type) -> np.ndarray | None:
    """An optional argument of the kernels as a contiguous array, or None where it is absent or empty (how
    a caller that must pass arrays, such as tf.numpy_function's, leaves it out)."""
    return None if array is None or array.size == 0 else np.ascontiguousarray(array, dtype=dtype)


def _width(kernel: np.ndarray | None) -> int:
    """The input width of an optional input kernel [I, 4U] (0 without one), which the loops take in whole
    vectors."""
    if kernel is None:
        return 0
    check_units(kernel.shape[0])
    return kernel.shape[0]


def _pointer(array: np.ndarray | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if array is None else array.ctypes.data)


class NativeKernels:
    """The compiled kernels, called on numpy arrays (float32, the layouts of lstm_loops.cc and output_loss.cc)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._lib = library
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        library.lstm_forward.argtypes = [integer] * 4 + [pointer] * 12 + [integer]
        library.lstm_backward.argtypes = [integer] * 4 + [pointer] * 10 + [integer]
        for function in (library.lstm_forward, library.lstm_backward):
            function.restype = integer
        library.lstm_bias_blocks.argtypes = [integer]
        library.lstm_bias_blocks.restype = integer
        library.output_loss.argtypes = [integer] * 3 + [pointer] * 5 + [ctypes.c_double] + [pointer] * 5 + [integer]
        library.output_loss.restype = integer
        library.output_loss_groups.argtypes = [integer]
        library.output_loss_groups.restype = integer
        self.threads = _threads()
        self._buffers = _Buffers()

    def forward(self, inputs: np.ndarray, keep: np.ndarray, bias: np.ndarray, recurrent: np.ndarray,
                kernel: np.ndarray | None = None, ids: np.ndarray | None = None, dropout: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Hidden states [T, B, U] (after dropout, with `dropout`), each step's previous ones (zeros where a
        sequence starts: `keep` [T, B] is 0 there and 1 where the state goes on; for the recurrent kernel's
        gradient; with `kernel`, [T, B, I + U]: each step's inputs, then those, for both kernels' gradients
        in one product) and the backward pass's records ([T, B, 4U] and [T, B, 2U]). The input projections
        without bias are `inputs` [T, B, 4U]; or with `kernel` [I, 4U], inputs [T, B, I] @ kernel; or with
        `ids` [T, B], rows of `inputs` [events, 4U]. `dropout` is [threshold, seed, seed] (uint32): a value is kept
        where its 16 random bits fall below the threshold (of 65536), and scaled by 65536 / threshold. Empty
        arrays for `kernel`, `ids` or `dropout` are the same as None."""
        units = recurrent.shape[0]
        check_units(units)
        steps, rows = keep.shape
        keep, bias, recurrent, inputs = (np.ascontiguousarray(a, dtype=np.float32)
                                         for a in (keep, bias, recurrent, inputs))
        kernel, ids, dropout = _given(kernel, np.float32), _given(ids, np.int32), _given(dropout, np.uint32)
        width = _width(kernel)
        if ids is not None and (ids.min() < 0 or ids.max() >= len(inputs)):
            raise ValueError(f"event ids must be in [0, {len(inputs)})")
        hs = self._buffers.empty((steps, rows, units))
        h_prev = self._buffers.empty((steps, rows, width + units))
        derivs = self._buffers.empty((steps, rows, 4 * units))
        cell = self._buffers.empty((steps, rows, 2 * units))
        out = hs if dropout is None else self._buffers.empty((steps, rows, units))
        failed = steps and rows and self._lib.lstm_forward(
            steps, rows, units, width, _pointer(inputs), _pointer(ids), _pointer(kernel), _pointer(keep),
            _pointer(bias), _pointer(recurrent), _pointer(hs), _pointer(h_prev), _pointer(derivs), _pointer(cell),
            _pointer(dropout), _pointer(out), self.threads)
        if out is not hs:
            self._buffers.release(hs)  # the states before dropout are needed only inside the loop
        if failed:
            raise ValueError(f"the native loops refused {steps} steps x {rows} rows x {units} units")
        for array in (out, h_prev, derivs, cell):
            self._buffers.hand_out(array)
        return out, h_prev, derivs, cell

    def backward(self, keep: np.ndarray, dhs: np.ndarray, derivs: np.ndarray, cell: np.ndarray,
                 recurrent: np.ndarray, kernel: np.ndarray | None = None, dropout: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gate pre-activation gradients [T, B, 4U], partial sums of them whose sum is the bias gradient, and
        with the input `kernel` [I, 4U] the inputs' gradient [T, B, I] (else an empty array); `dropout` as
        given to `forward` (`dhs` are then the gradients of the output after dropout); empty arrays as None."""
        steps, rows, units = dhs.shape
        check_units(units)
        keep, dhs, derivs, cell, recurrent = (np.ascontiguousarray(a, dtype=np.float32)
                                              for a in (keep, dhs, derivs, cell, recurrent))
        kernel, dropout = _given(kernel, np.float32), _given(dropout, np.uint32)
        width = _width(kernel)
        dz = self._buffers.empty((steps, rows, 4 * units))
        dx = self._buffers.empty((steps, rows, width))
        for array in (dz, dx):
            self._buffers.hand_out(array)
        partial = np.zeros((self._lib.lstm_bias_blocks(rows), 4 * units), dtype=np.float32)
        if steps and rows and self._lib.lstm_backward(
                steps, rows, units, width, _pointer(keep), _pointer(dhs), _pointer(derivs), _pointer(cell),
                _pointer(recurrent), _pointer(kernel), _pointer(dropout), _pointer(dz), _pointer(dx),
                _pointer(partial), self.threads):
            raise ValueError(f"the native loops refused {steps} steps x {rows} rows x {units} units")
        return dz, partial, dx

    def output_loss(self, hidden: np.ndarray, kernel: np.ndarray, bias: np.ndarray, labels: np.ndarray,
                    mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The output layer (hidden [..., H] @ kernel [H, C] + bias) and its cross-entropy against `labels`
        (int, the shape of `mask`), averaged over the positions where `mask` is not 0 with it as weights:
        the mean loss and the top-1 accuracy there (float32 scalars), and the loss's gradients with respect
        to `hidden`, `kernel` and `bias`."""
        width, classes = kernel.shape
        check_units(width)
        hidden, kernel, bias, mask = (np.ascontiguousarray(a, dtype=np.float32) for a in (hidden, kernel, bias, mask))
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        rows = mask.size
        total = float(mask.sum(dtype=np.float64))
        d_hidden = self._buffers.empty(hidden.shape)
        self._buffers.hand_out(d_hidden)
        d_kernel, d_bias = np.zeros_like(kernel), np.zeros_like(bias)
        sums = np.zeros(2, dtype=np.float64)
        if rows:
            padded = -(-classes // UNIT_MULTIPLE) * UNIT_MULTIPLE
            workspace = self._buffers.empty((self._lib.output_loss_groups(rows), width + 1, padded))
            failed = self._lib.output_loss(rows, width, classes, _pointer(hidden), _pointer(kernel), _pointer(bias),
                                           _pointer(labels), _pointer(mask), total, _pointer(sums),
                                           _pointer(d_hidden), _pointer(d_kernel), _pointer(d_bias),
                                           _pointer(workspace), self.threads)
            self._buffers.release(workspace)
            if failed:
                raise ValueError(f"the native output layer refused {rows} rows x {width} units x {classes} classes "
                                 "or a label outside them")
        with np.errstate(divide="ignore", invalid="ignore"):  # no real position: NaN, as TensorFlow gives
            loss, accuracy = (np.float32(s / total) for s in sums)
        return loss, accuracy, d_hidden, d_kernel, d_bias


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        units = [str(path) for path in SOURCES if path.suffix == ".cc"]
        result = subprocess.run([*shlex.split(compiler), *FLAGS, "-o", tmp, *units], capture_output=True,
                                text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise OSError(f"{compiler} failed: {first[:300]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def load() -> NativeKernels | str:
    """The native loops, built if need be; or, where they cannot be had, one line saying why."""
    compiler = find_compiler()
    if compiler is None:
        return "no C++ compiler found (install g++ or clang++, or set CXX)"
    try:
        command = shlex.split(compiler)
        version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return f"the C++ compiler {compiler!r} does not run ({exc})"
    try:
        sources = [path.read_text(encoding="utf-8") for path in SOURCES]
        signature = "\0".join([*sources, compiler, version, *FLAGS, _cpu_signature()])
        key = hashlib.sha256(signature.encode()).hexdigest()[:16]
        target = cache_dir() / f"training_kernels-{key}.so"
        if not target.is_file():
            _build(compiler, target)
        return NativeKernels(ctypes.CDLL(str(target)))
    except subprocess.TimeoutExpired:
        return f"building the native loops with {compiler} took over {BUILD_TIMEOUT_S} s; gave up"
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:  # RuntimeError: no home folder
        return f"building the native loops failed: {exc}"
