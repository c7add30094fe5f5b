"""The polyphony encoding: exact events for a hand-written example and a round-trip property."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from chiptune_forge.encoding import (
    CONTINUED_NOTE,
    END,
    NEW_NOTE,
    NUM_CLASSES,
    START,
    STEP_END,
    decode,
    encode,
    event_name,
)
from chiptune_forge.midi import QuantizedPiece


def N(p: int) -> int:
    return NEW_NOTE + p


def C(p: int) -> int:
    return CONTINUED_NOTE + p


def test_vocabulary() -> None:
    assert NUM_CLASSES == 259
    assert (START, END, STEP_END, NEW_NOTE, CONTINUED_NOTE) == (0, 1, 2, 3, 131)
    assert event_name(N(60)) == "NEW_NOTE(60)"
    assert event_name(C(127)) == "CONTINUED_NOTE(127)"
    assert event_name(258) == "CONTINUED_NOTE(127)"


def test_two_bar_example_exact_events() -> None:
    # Bar 1: a C major chord (60, 64, 67) held for 4 steps, then 72 for two steps.
    # Bar 2: 48 held 8 steps (a long note); 72 re-struck at steps 16 and 17 (re-struck note).
    notes = [
        (60, 0, 4, 100), (64, 0, 4, 100), (67, 0, 4, 100),
        (72, 4, 6, 100),
        (48, 16, 24, 100),
        (72, 16, 17, 100), (72, 17, 18, 100),
    ]
    piece = QuantizedPiece.from_notes(notes, num_steps=32)
    events = encode(piece).tolist()
    expected = [START]
    expected += [N(67), N(64), N(60), STEP_END]
    expected += [C(67), C(64), C(60), STEP_END] * 3
    expected += [N(72), STEP_END, C(72), STEP_END]
    expected += [STEP_END] * 10  # steps 6..15 are silent
    expected += [N(72), N(48), STEP_END]  # step 16: highest pitch first
    expected += [N(72), C(48), STEP_END]  # step 17: 72 re-struck, 48 continues
    expected += [C(48), STEP_END] * 6  # steps 18..23
    expected += [STEP_END] * 8  # steps 24..31
    expected += [END]
    assert events == expected
    back = decode(events)
    assert sorted(zip(back.pitch.tolist(), back.start.tolist(), back.end.tolist(), strict=True)) == sorted(
        (p, s, e) for p, s, e, _ in notes)
    assert back.num_steps == 32


def test_decode_ignores_stray_events() -> None:
    events = [START, C(60), N(62), START, STEP_END, END, C(62), STEP_END, STEP_END]
    back = decode(events)
    assert list(zip(back.pitch.tolist(), back.start.tolist(), back.end.tolist(), strict=True)) == [(62, 0, 2)]
    assert back.num_steps == 3


def test_encode_without_start_or_end() -> None:
    piece = QuantizedPiece.from_notes([(60, 0, 1, 100)], num_steps=2)
    assert encode(piece, start=False, end=False).tolist() == [N(60), STEP_END, STEP_END]


notes_strategy = st.lists(
    st.tuples(st.integers(0, 127), st.integers(0, 40), st.integers(1, 12)), min_size=0, max_size=40)


@settings(max_examples=200, deadline=None)
@given(notes_strategy, st.integers(0, 8))
def test_round_trip_property(raw: list[tuple[int, int, int]], extra: int) -> None:
    piece = QuantizedPiece.from_notes([(p, s, s + d, 100) for p, s, d in raw])
    piece.num_steps += extra
    events = encode(piece)
    assert events.dtype == np.int16
    assert events[0] == START and events[-1] == END
    assert int(np.sum(events == STEP_END)) == piece.num_steps
    back = decode(events)
    assert back.num_steps == piece.num_steps
    assert np.array_equal(back.pitch, piece.pitch)
    assert np.array_equal(back.start, piece.start)
    assert np.array_equal(back.end, piece.end)
    # Within each step note events are sorted by pitch, highest first.
    step: list[int] = []
    for ev in events.tolist()[1:-1]:
        if ev == STEP_END:
            pitches = [(e - NEW_NOTE) % 128 for e in step]
            assert pitches == sorted(pitches, reverse=True)
            step = []
        else:
            step.append(ev)
