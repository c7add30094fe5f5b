"""The polyphony event encoding (Magenta polyphony_rnn compatible): quantized notes <-> event ids.

Event ids: 0 START, 1 END, 2 STEP_END, 3+p NEW_NOTE(p), 131+p CONTINUED_NOTE(p): 259 classes.
Within a step the note events are sorted by pitch, highest first, then STEP_END closes the step.
"""

from __future__ import annotations

import numpy as np

from .midi import QuantizedPiece

ENCODING_VERSION = "polyphony-1"
START = 0
END = 1
STEP_END = 2
NEW_NOTE = 3
CONTINUED_NOTE = 131
NUM_CLASSES = 259
DEFAULT_EVENT = STEP_END
DEFAULT_VELOCITY = 100


def new_note(pitch: int) -> int:
    return NEW_NOTE + pitch


def continued_note(pitch: int) -> int:
    return CONTINUED_NOTE + pitch


def event_name(event: int) -> str:
    """A readable name, for error messages and debugging."""
    if event == START:
        return "START"
    if event == END:
        return "END"
    if event == STEP_END:
        return "STEP_END"
    if NEW_NOTE <= event < CONTINUED_NOTE:
        return f"NEW_NOTE({event - NEW_NOTE})"
    if CONTINUED_NOTE <= event < NUM_CLASSES:
        return f"CONTINUED_NOTE({event - CONTINUED_NOTE})"
    raise ValueError(f"event id {event} is outside 0..{NUM_CLASSES - 1}")


def encode(piece: QuantizedPiece, start: bool = True, end: bool = True) -> np.ndarray:
    """Encode a quantized piece as event ids (int16): START, each step's notes then STEP_END, END.

    Every step up to `piece.num_steps` is written, trailing silence included, so the length survives.
    """
    num_steps = piece.num_steps
    # For each step, the pitches sounding in it, marked new (1) or continued (2).
    state = np.zeros((num_steps, 128), dtype=np.int8)
    for p, s, e in zip(piece.pitch, piece.start, piece.end, strict=True):
        state[s + 1:e, p] = 2
        state[s, p] = 1
    # Highest pitch first within a step: flip the pitch axis and take non-zero cells in row-major order.
    flipped = state[:, ::-1]
    steps, cols = np.nonzero(flipped)
    pitches = 127 - cols
    kinds = flipped[steps, cols]
    note_ids = np.where(kinds == 1, NEW_NOTE + pitches, CONTINUED_NOTE + pitches)
    counts = np.bincount(steps, minlength=num_steps)
    total = len(note_ids) + num_steps + int(start) + int(end)
    out = np.empty(total, dtype=np.int16)
    offset = int(start)
    if start:
        out[0] = START
    # Position of each step's STEP_END: after all notes of steps <= that step plus earlier STEP_ENDs.
    step_end_pos = offset + np.cumsum(counts) + np.arange(num_steps)
    out[step_end_pos] = STEP_END
    note_pos = offset + np.arange(len(note_ids)) + steps
    out[note_pos] = note_ids
    if end:
        out[-1] = END
    return out


def decode(events: np.ndarray | list[int], velocity: int = DEFAULT_VELOCITY, qpm: float = 120.0) -> QuantizedPiece:
    """Decode event ids to a quantized piece.

    NEW_NOTE opens a note; at each STEP_END every open note that was not continued in that step closes;
    a CONTINUED_NOTE for a pitch that is not open, and START/END inside the stream, are ignored. Notes
    still open at the end close at the final step.
    """
    step = 0
    open_start: dict[int, int] = {}
    continued: set[int] = set()
    opened: set[int] = set()
    notes: list[tuple[int, int, int, int]] = []
    for ev in np.asarray(events, dtype=np.int64).tolist():
        if ev == STEP_END:
            for p in [p for p in open_start if p not in continued and p not in opened]:
                notes.append((p, open_start.pop(p), step, velocity))
            continued.clear()
            opened.clear()
            step += 1
        elif NEW_NOTE <= ev < CONTINUED_NOTE:
            p = ev - NEW_NOTE
            if p in open_start and p not in opened:
                notes.append((p, open_start[p], step, velocity))
            open_start[p] = step
            opened.add(p)
        elif CONTINUED_NOTE <= ev < NUM_CLASSES:
            p = ev - CONTINUED_NOTE
            if p in open_start:
                continued.add(p)
        elif ev not in (START, END):
            raise ValueError(f"event id {ev} is outside 0..{NUM_CLASSES - 1}")
    final = step if not (opened or continued) else step + 1
    for p, s in open_start.items():
        notes.append((p, s, max(final, s + 1), velocity))
    return QuantizedPiece.from_notes(notes, num_steps=max(step, final if open_start else step), qpm=qpm)
