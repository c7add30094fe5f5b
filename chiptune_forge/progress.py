"""Progress bars for long work, shown on stderr only when someone is watching."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False) -> Iterator[T]:
    """Wrap an iterable in a tqdm bar on stderr; silent when stderr is not a terminal or disabled."""
    quiet = disable or not sys.stderr.isatty()
    yield from tqdm(items, total=total, desc=desc, unit=unit, disable=quiet, file=sys.stderr,
                    dynamic_ncols=True)


def bar(total: int | None, desc: str, unit: str = "it", disable: bool = False, initial: int = 0) -> tqdm:
    """A manually updated bar (for loops that are not a plain iterable, such as training steps)."""
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True,
                disable=disable or not sys.stderr.isatty())
