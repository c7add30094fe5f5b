"""Voice allocation: never more than 8 voices, and the stated stealing rule."""

from __future__ import annotations

import dataclasses

import numpy as np

from chiptune_forge.arrange import arrange
from chiptune_forge.midi import Note, Piece
from chiptune_forge.presets import load_preset
from chiptune_forge.render import plan_voices, render_piece
from chiptune_forge.snes.voices import VoiceRequest, allocate_voices


def max_sounding(intervals: list[tuple[int, int]]) -> int:
    events = sorted([(a, 1) for a, b in intervals if b > a] + [(b, -1) for a, b in intervals if b > a])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_a_12_note_chord_never_sounds_more_than_8_voices() -> None:
    chord = [Note(48 + 3 * k, 100, 0.5, 2.5) for k in range(12)]
    preset = dataclasses.replace(load_preset("snes_dry"), drums=False)
    voices, assignments = plan_voices(arrange(Piece(chord), drums=False), preset)
    playing = [(v.start, a.end) for v, a in zip(voices, assignments, strict=True) if a is not None]
    assert len(voices) == 12 and len(playing) == 8
    assert max_sounding(playing) == 8
    for voice_index in range(8):  # each voice plays one thing at a time
        mine = [(v.start, a.end) for v, a in zip(voices, assignments, strict=True) if a and a.voice == voice_index]
        assert max_sounding(mine) <= 1
    audio = render_piece(Piece(chord), preset)
    assert np.abs(audio).max() > 0.05


def test_dense_music_stays_within_8_voices() -> None:
    rng = np.random.default_rng(3)
    notes = [Note(int(rng.integers(40, 90)), 100, float(t), float(t + rng.uniform(0.1, 1.5)))
             for t in np.sort(rng.uniform(0, 10, 120))]
    voices, assignments = plan_voices(arrange(Piece(notes)), load_preset("snes"))
    playing = [(v.start, a.end) for v, a in zip(voices, assignments, strict=True) if a is not None]
    assert max_sounding(playing) <= 8


def req(kon: int, koff: int, end: int, priority: int = 1) -> VoiceRequest:
    return VoiceRequest(kon, koff, end, priority)


def test_free_voices_are_taken_lowest_first() -> None:
    out = allocate_voices([req(0, 10, 20), req(5, 10, 20), req(30, 40, 50)], voices=2)
    assert [a.voice for a in out if a] == [0, 1, 0]


def test_a_releasing_voice_is_taken_before_a_held_one() -> None:
    # voice 0 holds until 100; voice 1 was keyed off at 20 and still rings until 60
    out = allocate_voices([req(0, 100, 120), req(0, 20, 60), req(30, 80, 90)], voices=2)
    assert out[2] is not None and out[2].voice == 1
    assert out[1] is not None and out[1].end == 30  # cut where the new note keys on
    assert out[0] is not None and out[0].end == 120


def test_the_lowest_priority_oldest_note_is_stolen() -> None:
    out = allocate_voices([req(0, 100, 120, 3), req(10, 100, 120, 1), req(20, 100, 120, 1), req(30, 90, 95, 2)],
                          voices=3)
    stolen = out[1]
    assert out[3] is not None and stolen is not None and out[3].voice == stolen.voice and stolen.end == 30


def test_a_note_that_outranks_nothing_is_dropped() -> None:
    out = allocate_voices([req(0, 100, 120, 4), req(0, 100, 120, 4), req(10, 50, 60, 1)], voices=2)
    assert out[2] is None and out[0] is not None and out[0].end == 120


def test_notes_keyed_on_together_do_not_steal_from_each_other() -> None:
    out = allocate_voices([req(0, 100, 120)] * 3, voices=2)
    assert out[0] is not None and out[1] is not None and out[2] is None
    assert out[0].end == out[1].end == 120
