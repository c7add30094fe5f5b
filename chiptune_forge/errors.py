"""The one exception type the CLI turns into a clean one-line message instead of a traceback, the
did-you-mean hint those messages share, and the one-line form of a warning."""

from __future__ import annotations

import sys
from collections.abc import Iterable


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


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the option closest to a mistyped word (the same word in another case is
    closest), or "" when none is close."""
    import difflib

    by_lower = {option.lower(): option for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def print_warning(message: str) -> None:
    """A problem that did not stop the work (the input was read anyway), as one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)
