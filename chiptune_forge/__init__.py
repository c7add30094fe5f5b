"""chiptune-forge: original SNES-style game music from a trained polyphony RNN, built as a game asset step."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .builder import BuildReport

__version__ = "0.1.0"


def build(manifest: str | Path = "chiptune.toml", **options: Any) -> BuildReport:
    """Build a soundtrack from its manifest; see `chiptune_forge.builder.build` for the options.

    Kept as a thin wrapper so `import chiptune_forge` stays light: the build machinery loads on first use.
    """
    from .builder import build as _build

    return _build(manifest, **options)
