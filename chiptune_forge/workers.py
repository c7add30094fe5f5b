"""Worker processes for parallel stages (dataset building, rendering and exporting a soundtrack), and a
producer run ahead of its consumer in a forked process (the two halves of the sampler's mixer).

Workers leave Ctrl-C to the parent, which stops them at once and cleans up: waiting for a pool to wind
down after an interrupt can hang (an interrupt that lands while the parent holds the pool's queue lock
leaves a worker blocked on it forever).
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import pickle
import signal
import struct
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .errors import ChiptuneError

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1

held_fds: set[int] = set()
"""Descriptors the parent holds that a forked worker must close at once (the build lock)."""


def worker_init(parent: int) -> None:
    """Ignore Ctrl-C (the parent handles it) and take SIGTERM's default; on Linux also get SIGTERM when the
    parent dies without cleaning up (killed with SIGKILL), so none is left behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for fd in held_fds:
        os.close(fd)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)


def new_executor(workers: int) -> ProcessPoolExecutor:
    """Workers forked from this process where the platform forks (Linux): they start at once with what is
    imported here, and worker_init's parent check holds (Python 3.14 would otherwise use a fork server)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=worker_init,
                               initargs=(os.getpid(),))


def stop_workers(executor: ProcessPoolExecutor) -> None:
    """Terminate a pool's workers at once; what they leave half-written is the caller's to clean up. The
    executor has no public way to reach its processes, hence `_processes`."""
    workers = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        process.terminate()
    for process in workers:
        process.join(timeout=5)


# ----------------------------------------------------------------------------------------- running ahead

_ITEM = struct.Struct("<q")  # what the producer sends per item: the item (>= 0), or one of these
_DONE, _FAILED = -1, -2
MAX_AHEAD = 4096  # each free slot is a byte waiting in a pipe: far below what one holds


def can_run_ahead() -> bool:
    """Whether run_ahead gains anything here: on Linux, with two CPUs for this process (its affinity and
    any cgroup quota), and no other thread in it, Python's or native (a thread holding a lock at the fork
    would leave the child's copy of that lock held)."""
    return sys.platform.startswith("linux") and _cpus() >= 2 and _threads() == 1


def _threads() -> int:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return max(threading.active_count(), 2)  # unknown: do not fork


def _cpus() -> float:
    """CPUs this process may use: its affinity, under the cgroup's CPU quota where one is set."""
    cpus = float(len(os.sched_getaffinity(0)))
    quota = _cgroup_quota()
    return min(cpus, quota) if quota else cpus


def _cgroup_quota() -> float | None:
    """CPUs' worth of time the cgroup allows (cgroup v2, else v1); None without a limit."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="ascii") as f:
                quota = f.read().strip()
            with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="ascii") as f:
                period = f.read().strip()
        except OSError:
            return None
    try:
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def shared_array(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A zeroed array in memory that a process forked later shares with this one (not copied on write)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def run_ahead(items: Iterator[int], ahead: int) -> Iterator[int]:
    """Iterate `items` in a forked process while this one uses what it gave, up to `ahead` items behind.

    The items are small non-negative integers (say, a block's length); the data travels in a shared_array
    made before the call, which the producer fills slot by slot (item k in slot k % ahead). The producer
    waits for the slot it is about to fill: slot k is free again once this side asks for item k + 1.
    Where no process can be started (a limit on processes or open files), `items` simply runs here.
    What the producer raises is raised here; a producer that dies (killed, out of memory) raises
    ChiptuneError saying how. If this side stops early (an error, Ctrl-C, the consumer closing the
    generator), the producer is killed; either way it is waited for.
    """
    if not 1 <= ahead <= MAX_AHEAD:
        raise ValueError(f"ahead must be 1 to {MAX_AHEAD}, not {ahead}")
    fds: list[int] = []
    try:
        fds += os.pipe()
        fds += os.pipe()
    except OSError:
        fds = _closed(fds)
    if not fds:
        yield from items
        return
    ready_r, ready_w, free_r, free_w = fds
    os.write(free_w, bytes(ahead))
    masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # until each side is ready for Ctrl-C
    gc.freeze()  # the collector would otherwise touch every object in the child, copying their pages
    try:
        pid = os.fork()
    except OSError:  # no process to spare
        pid = -1
    if pid == 0:  # pragma: no cover (the child's coverage is not collected; its output is tested)
        _produce(items, masked, ready_w, free_r, (ready_r, free_w))
    gc.unfreeze()
    waited = False
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, masked)
        if pid < 0:
            yield from items
            return
        _closed([ready_w, free_r])  # the child's ends
        fds = [ready_r, free_w]
        while True:
            head = _read(ready_r, _ITEM.size)
            if len(head) < _ITEM.size:
                _, status = os.waitpid(pid, 0)
                waited = True
                reason = _exit_reason(status)
                raise ChiptuneError(f"a worker process stopped ({reason}{': out of memory?' * ('SIGKILL' in reason)})")
            (item,) = _ITEM.unpack(head)
            if item == _DONE:
                break
            if item == _FAILED:
                (size,) = _ITEM.unpack(_read(ready_r, _ITEM.size))
                raise _unpickled(_read(ready_r, size))
            yield item
            with contextlib.suppress(BrokenPipeError):  # it died: the next read says how
                os.write(free_w, b"\0")
    finally:
        _closed(fds)
        if pid > 0 and not waited:  # stopped early it may be mid-item or waiting; after the last item it is exiting
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _closed(fds: list[int]) -> list[int]:
    """Close the descriptors; returns an empty list (what is left open)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    return []


def _read(fd: int, n: int) -> bytes:
    """n bytes from a pipe, fewer only at its end."""
    data = b""
    while len(data) < n:
        part = os.read(fd, n - len(data))
        if not part:
            break
        data += part
    return data


def _exit_reason(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"killed by signal {-code}"


def _unpickled(data: bytes) -> BaseException:
    """The producer's exception, as it sent it (it is this program's own forked process)."""
    try:
        exc = pickle.loads(data)
    except Exception as failure:  # an exception whose class will not rebuild from its arguments
        return RuntimeError(f"a worker process failed, and its error could not be passed on ({failure})")
    return exc if isinstance(exc, BaseException) else RuntimeError(repr(exc))


def _produce(items: Iterator[int], mask: set[signal.Signals], ready_w: int, free_r: int,
             unused: tuple[int, int]) -> None:
    """The forked side of run_ahead: never returns. It stops when this side's end of the pipes closes, so
    it does not outlive a parent that dies."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _closed(list(unused))
        while os.read(free_r, 1):  # end of file: the parent is gone or stopped
            item = next(items, _DONE)
            os.write(ready_w, _ITEM.pack(item))
            if item == _DONE:
                break
    except BaseException as exc:  # passed to the parent, which raises it
        try:
            data = pickle.dumps(exc)
        except Exception:
            data = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
        message = memoryview(_ITEM.pack(_FAILED) + _ITEM.pack(len(data)) + data)
        while message:
            message = message[os.write(ready_w, message):]
        code = 1
    finally:
        os._exit(code)
