"""The one exception type the CLI turns into a clean one-line message instead of a traceback."""

from __future__ import annotations


class ChiptuneError(Exception):
    """A user-facing error: bad input, a missing file, an impossible request.

    The message is complete on its own (it names the file and, where known, the line, key or note),
    so the CLI prints it as it is and exits non-zero.
    """


class MidiError(ChiptuneError):
    """A MIDI file that cannot be read or makes no musical sense."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UsageError(ChiptuneError):
    """A request that names what is not there (a missing manifest, an unknown track): exit code 2 where a
    command distinguishes bad requests from failed work."""
