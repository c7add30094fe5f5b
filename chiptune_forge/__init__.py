"""chiptune-forge: original SNES-style game music from a trained polyphony RNN, built as a game asset step."""

__version__ = "0.1.0"
