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

from chiptune_forge.errors import ChiptuneError
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


@pytest.mark.parametrize("error", [ValueError("bad note 61"), ChiptuneError("song.mid: bad note 61")])
def test_a_failing_producer_raises_its_error_here(error: Exception) -> None:
    pid = shared_array((1,), np.int64)

    def produce() -> Iterator[int]:
        pid[0] = os.getpid()
        yield 1
        raise error

    items = run_ahead(produce(), 2)
    assert next(items) == 1
    with pytest.raises(type(error), match="bad note 61"):
        next(items)
    assert reaped(int(pid[0]))


@pytest.mark.parametrize(("signum", "reported"), [(signal.SIGKILL, r"killed by SIGKILL: out of memory\?"),
                                                  (signal.SIGRTMIN + 6, "killed by signal")])  # one with no name
def test_a_producer_that_dies_is_reported(signum: int, reported: str) -> None:
    pid = shared_array((1,), np.int64)

    def produce() -> Iterator[int]:
        pid[0] = os.getpid()
        yield 1
        os.kill(os.getpid(), signum)
        yield 2

    with pytest.raises(ChiptuneError, match=rf"a worker process stopped \({reported}"):
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


def test_without_pipes_to_spare_the_items_run_here(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []

    def produce() -> Iterator[int]:
        for k in range(5):
            made.append(os.getpid())
            yield k

    def no_pipe() -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "pipe", no_pipe)
    assert list(run_ahead(produce(), 2)) == list(range(5))
    assert made == [os.getpid()] * 5


def test_how_far_ahead_is_checked() -> None:
    with pytest.raises(ValueError, match="ahead must be 1 to"):
        next(run_ahead(iter([1]), 0))
