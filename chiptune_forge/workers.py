"""Worker processes for parallel stages (dataset building, rendering and exporting a soundtrack).

Workers leave Ctrl-C to the parent, which stops them at once and cleans up: waiting for a pool to wind
down after an interrupt can hang (an interrupt that lands while the parent holds the pool's queue lock
leaves a worker blocked on it forever).
"""

from __future__ import annotations

import os
import signal
import sys
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
