"""Running a producer ahead of its consumer in a forked process: order, back-pressure, failures, clean-up."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from chiptune_forge.workers import can_run_ahead, run_ahead, shared_array

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="run_ahead forks (Linux)")


def reaped(pid: int) -> bool:
    """Whether the child `pid` has exited and been waited for (by run_ahead: nothing else here waits)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_items_and_their_data_arrive_in_order_through_the_shared_slots() -> None:
    ahead = 3
    slots = shared_array((ahead, 4), np.int64)

    def produce() -> Iterator[int]:
        for k in range(50):
            slots[k % ahead] = [k, k * k, os.getpid(), 0]
            yield k % 4 + 1

    seen = []
    for k, n in enumerate(run_ahead(produce(), ahead)):
        slot = slots[k % ahead]
        seen.append((int(slot[0]), int(slot[1]), n))
        assert int(slot[2]) != os.getpid()  # made in the other process
        time.sleep(0.001)  # a slow consumer: the producer waits for the slot rather than overwrite it
        assert int(slots[k % ahead][0]) == k
    assert seen == [(k, k * k, k % 4 + 1) for k in range(50)]
    assert reaped(int(slots[0][2]))


def test_a_failing_producer_raises_its_error_here() -> None:
    pid = shared_array((1,), np.int64)

    def produce() -> Iterator[int]:
        pid[0] = os.getpid()
        yield 1
        raise ValueError("bad note 61")

    items = run_ahead(produce(), 2)
    assert next(items) == 1
    with pytest.raises(RuntimeError, match="ValueError: bad note 61"):
        next(items)
    assert reaped(int(pid[0]))


def test_a_producer_that_dies_is_reported() -> None:
    pid = shared_array((1,), np.int64)

    def produce() -> Iterator[int]:
        pid[0] = os.getpid()
        yield 1
        os.kill(os.getpid(), signal.SIGKILL)
        yield 2

    with pytest.raises(RuntimeError, match="killed by SIGKILL"):
        list(run_ahead(produce(), 2))
    assert reaped(int(pid[0]))


def test_stopping_early_stops_the_producer() -> None:
    pid = shared_array((1,), np.int64)

    def produce() -> Iterator[int]:
        pid[0] = os.getpid()
        yield from range(10**9)

    items = run_ahead(produce(), 2)
    assert [next(items) for _ in range(5)] == list(range(5))
    items.close()
    assert reaped(int(pid[0]))


def test_a_process_with_other_threads_does_not_fork() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not can_run_ahead()
    finally:
        stop.set()
        thread.join()
