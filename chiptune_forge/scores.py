"""Musical statistics of a quantized piece, used to pick game tracks among generated candidates.

Each statistic is a plain float so the set can go into JSON and a build cache unchanged. They describe texture
(range, density, polyphony), tonality (how well one major or minor scale explains the notes) and silence.
"""

from __future__ import annotations

import numpy as np

from .midi import QuantizedPiece

# Scale templates as pitch classes above the tonic. Natural minor has the same pitch-class sets as the
# relative major; harmonic minor (raised seventh) is what minor-key game music mostly uses.
SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "natural minor": (0, 2, 3, 5, 7, 8, 10),
    "harmonic minor": (0, 2, 3, 5, 7, 8, 11),
}


def _scale_masks() -> np.ndarray:
    """[templates x 12 roots, 12] booleans: which pitch classes each scale on each root contains."""
    rows = []
    for degrees in SCALES.values():
        base = np.zeros(12, dtype=bool)
        base[list(degrees)] = True
        rows.extend(np.roll(base, root) for root in range(12))
    return np.array(rows)


_SCALE_MASKS = _scale_masks()


def pitch_range(q: QuantizedPiece) -> float:
    """Semitones from the lowest to the highest note (0 for an empty piece)."""
    return float(q.pitch.max() - q.pitch.min()) if len(q) else 0.0


def notes_per_bar(q: QuantizedPiece) -> float:
    """Note onsets per bar of the piece's time signature (partial bars count by their length)."""
    bars = q.num_steps / q.steps_per_bar
    return len(q) / bars if bars else 0.0


def sounding_counts(q: QuantizedPiece) -> np.ndarray:
    """How many notes sound at each step [num_steps]."""
    delta = np.zeros(q.num_steps + 1, dtype=np.int64)
    np.add.at(delta, np.minimum(q.start, q.num_steps), 1)
    np.add.at(delta, np.minimum(q.end, q.num_steps), -1)
    return np.cumsum(delta)[:q.num_steps]


def mean_polyphony(q: QuantizedPiece) -> float:
    """Mean number of notes sounding together, over the steps where anything sounds."""
    counts = sounding_counts(q)
    active = counts[counts > 0]
    return float(active.mean()) if len(active) else 0.0


def scale_consistency(q: QuantizedPiece) -> float:
    """Fraction of notes inside the best-fitting major or minor scale (0 for an empty piece)."""
    if not len(q):
        return 0.0
    histogram = np.bincount(q.pitch % 12, minlength=12)
    return float((_SCALE_MASKS @ histogram).max() / len(q))


def empty_bar_fraction(q: QuantizedPiece) -> float:
    """Fraction of bars in which no note sounds at all (a held note keeps a bar from being empty)."""
    bar = q.steps_per_bar
    num_bars = -(-q.num_steps // bar)
    if not num_bars:
        return 0.0
    counts = np.zeros(num_bars * bar, dtype=np.int64)
    counts[:q.num_steps] = sounding_counts(q)
    empty = ~(counts.reshape(num_bars, bar) > 0).any(axis=1)
    return float(empty.mean())


DENSE_NOTES_PER_BAR = 8.0
"""About the lower quartile of the training corpus's notes per bar (VGMIDI windows: quartiles 8.9, 13.1, 18.2)."""


def sparseness(q: QuantizedPiece) -> float:
    """How many halvings of density the piece lies below DENSE_NOTES_PER_BAR: 0 at or above it, 1 at half
    of it, 2 at a quarter. The model finds held notes and rests easy to predict, so likelihood alone would
    pick the thinnest take; this term balances that."""
    bars = q.num_steps / q.steps_per_bar
    if not bars:
        return 0.0
    density = max(len(q), 1) / bars  # an empty piece counts as one note, to stay finite
    return float(max(0.0, np.log2(DENSE_NOTES_PER_BAR / density)))


def piece_statistics(q: QuantizedPiece) -> dict[str, float]:
    return {
        "pitch_range": pitch_range(q),
        "notes_per_bar": notes_per_bar(q),
        "mean_polyphony": mean_polyphony(q),
        "scale_consistency": scale_consistency(q),
        "empty_bar_fraction": empty_bar_fraction(q),
        "sparseness": sparseness(q),
    }
