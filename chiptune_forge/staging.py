"""Files written as a set: each under a hidden temporary name, all renamed into place once every one is
complete. A reader (a game watching its asset folder, a later command) sees the whole old set or the whole
new one, and a failure or Ctrl-C part way leaves the old files untouched and no temporary behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from .errors import ChiptuneError

PARTIAL_SUFFIX = ".partial"
"""`.NAME.partial`: hidden, and a name no game engine or tool takes for NAME itself."""


class StagedFiles:
    """Use as `with StagedFiles() as files: files.write(path, writer) ...; files.commit()`."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            for tmp, _ in self._staged:
                with contextlib.suppress(OSError):  # a read-only folder has nothing of ours to remove
                    tmp.unlink(missing_ok=True)

    def write(self, final: Path, write: Callable[[Path], None]) -> Path:
        """Have `write` make `final`'s content under its temporary name, which is returned."""
        if final.is_dir():  # found before anything is renamed into place, so no file of the set changes
            raise ChiptuneError(f"{final}: is a folder; cannot write the file there")
        tmp = final.with_name(f".{final.name}{PARTIAL_SUFFIX}")
        self._staged.append((tmp, final))
        try:
            write(tmp)
        except OSError as exc:
            raise ChiptuneError(f"{final}: cannot write ({exc.strerror or exc})") from None
        return tmp

    def commit(self) -> list[Path]:
        """Rename every file into place; returns their final paths in the order they were written."""
        for tmp, final in self._staged:
            try:
                os.replace(tmp, final)
            except OSError as exc:
                raise ChiptuneError(f"{final}: cannot write ({exc.strerror or exc})") from None
        return [final for _, final in self._staged]
