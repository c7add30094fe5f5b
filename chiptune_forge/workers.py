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
import signal
import struct
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

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
MESSAGE_LIMIT = 2048  # bytes of a producer's error passed on (well within what a pipe holds unread)


def can_run_ahead() -> bool:
    """Whether run_ahead gains anything here: on Linux, with a second core to run on, from a process with
    no other threads (a thread holding a lock at the fork would leave the child's copy of it held)."""
    return (sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) > 1
            and threading.active_count() == 1)


def shared_array(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A zeroed array in memory that a process forked later shares with this one (not copied on write)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def run_ahead(items: Iterator[int], ahead: int) -> Iterator[int]:
    """Iterate `items` in a forked process while this one uses what it gave, up to `ahead` items behind.

    The items are small non-negative integers (say, a block's length); the data travels in a shared_array
    made before the call, which the producer fills slot by slot (item k in slot k % ahead). The producer
    waits for the slot it is about to fill: slot k is free again once this side asks for item k + 1.
    Nothing of `items` runs in this process. A producer that fails raises RuntimeError here with its error;
    one that dies (killed, out of memory) raises RuntimeError saying so. If this side stops early (an
    error, Ctrl-C, the consumer closing the generator), the producer is killed.
    """
    ready_r, ready_w = os.pipe()
    free_r, free_w = os.pipe()
    os.write(free_w, bytes(ahead))
    gc.freeze()  # the collector would otherwise touch every object in the child, copying their pages
    try:
        pid = os.fork()
    except OSError:  # no process to spare (a limit): produce here instead
        gc.unfreeze()
        for fd in (ready_r, ready_w, free_r, free_w):
            os.close(fd)
        yield from items
        return
    if pid == 0:  # pragma: no cover (the child's coverage is not collected; its output is tested)
        _produce(items, (ready_r, free_w), ready_w, free_r)
    gc.unfreeze()
    os.close(ready_w)
    os.close(free_r)
    finished = False
    try:
        with open(ready_r, "rb", buffering=0) as ready:
            while True:
                head = ready.read(_ITEM.size)
                if len(head) < _ITEM.size:
                    _, status = os.waitpid(pid, 0)
                    finished = True
                    raise RuntimeError(f"the process working ahead stopped ({_exit_reason(status)})")
                (item,) = _ITEM.unpack(head)
                if item == _DONE:
                    break
                if item == _FAILED:
                    (size,) = _ITEM.unpack(ready.read(_ITEM.size))
                    raise RuntimeError(ready.read(size).decode(errors="replace"))
                yield item
                with contextlib.suppress(BrokenPipeError):  # it died: the next read says how
                    os.write(free_w, b"\0")
    finally:
        os.close(free_w)
        if not finished:  # stopped early it may be mid-item or waiting; after the last item it is exiting
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _exit_reason(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def _produce(items: Iterator[int], unused: tuple[int, int], ready_w: int, free_r: int) -> None:
    """The forked side of run_ahead: never returns. It stops when this side's end of the pipes closes, so
    it does not outlive a parent that dies."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        for fd in unused:
            os.close(fd)
        while os.read(free_r, 1):  # end of file: the parent is gone or stopped
            item = next(items, _DONE)
            os.write(ready_w, _ITEM.pack(item))
            if item == _DONE:
                break
    except BaseException as exc:  # reported to the parent, which raises it
        message = f"{type(exc).__name__}: {exc}".encode()[:MESSAGE_LIMIT]
        os.write(ready_w, _ITEM.pack(_FAILED) + _ITEM.pack(len(message)) + message)
        code = 1
    finally:
        os._exit(code)
