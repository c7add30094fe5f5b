"""chiptune-forge: original SNES-style game music from a trained polyphony RNN, built as a game asset step."""

__version__ = "0.1.0"


def build(manifest="chiptune.toml", **options):  # noqa: ANN001, ANN201 - signature documented in builder.build
    """Build a soundtrack from its manifest; see `chiptune_forge.builder.build` for the options."""
    from .builder import build as _build

    return _build(manifest, **options)
