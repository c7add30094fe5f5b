"""Arrangement: splitting one stream into smooth voices, keeping tracks, and drums made by rule."""

from __future__ import annotations

import itertools
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from chiptune_forge.arrange import CLOSED_HAT, CRASH, KICK, SNARE, TOMS, arrange, generate_drums, split_voices
from chiptune_forge.midi import Control, Note, Piece, TempoChange, TimeSignature


def overlaps(notes: list[Note]) -> bool:
    ordered = sorted(notes, key=lambda n: n.start)
    return any(b.start < a.end - 1e-9 for a, b in itertools.pairwise(ordered))


def chorale(bars: int = 4, beat: float = 0.5) -> list[Note]:
    """Four-part chords on each beat: soprano, alto, tenor, bass."""
    notes = []
    for k in range(bars * 4):
        t = k * beat
        root = (48, 45, 41, 43)[k // 4 % 4]
        for pitch in (root - 12, root + 4, root + 7, root + 12 + (k % 3) * 2):
            notes.append(Note(pitch, 90, t, t + beat))
    return notes


def test_chords_split_into_top_bottom_and_middle() -> None:
    notes = chorale()
    lead, harmony, bass = split_voices(notes)
    assert len(lead) == len(bass) == 16 and len(harmony) == 32
    by_time = defaultdict(list)
    for n in notes:
        by_time[n.start].append(n.pitch)
    assert all(n.pitch == max(by_time[n.start]) for n in lead)
    assert all(n.pitch == min(by_time[n.start]) for n in bass)
    assert split_voices(notes) == (lead, harmony, bass)  # deterministic


def test_a_lone_melody_is_all_lead_and_a_held_bass_stays_bass() -> None:
    melody = [Note(72 + (k % 5), 90, k * 0.25, k * 0.25 + 0.2) for k in range(16)]
    lead, harmony, bass = split_voices(melody)
    assert len(lead) == 16 and not harmony and not bass
    with_bass = [*melody, Note(36, 90, 0.0, 4.0), Note(38, 90, 4.0, 8.0)]
    lead, harmony, bass = split_voices(with_bass)
    assert [n.pitch for n in bass] == [36, 38] and len(lead) == 16


def test_a_higher_note_takes_over_the_lead_and_the_held_one_moves_to_harmony() -> None:
    notes = [Note(70, 90, 0.0, 2.0), Note(40, 90, 0.0, 2.0), Note(76, 90, 1.0, 1.5)]
    lead, harmony, bass = split_voices(notes)
    assert [n.pitch for n in lead] == [76] and [n.pitch for n in harmony] == [70] and [n.pitch for n in bass] == [40]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(30, 96), st.integers(0, 40), st.integers(1, 8)), min_size=1, max_size=60))
def test_lead_and_bass_are_single_lines_and_every_note_is_kept(raw: list[tuple[int, int, int]]) -> None:
    notes = [Note(p, 80, s * 0.125, (s + d) * 0.125) for p, s, d in raw]
    lead, harmony, bass = split_voices(notes)
    assert not overlaps(lead) and not overlaps(bass)
    assert sorted(lead + harmony + bass, key=repr) == sorted(notes, key=repr)


def test_multi_track_files_keep_their_tracks_ranked_by_register() -> None:
    notes = [Note(72, 90, 0, 1, program=80, track=1), Note(40, 90, 0, 1, program=33, track=2),
             Note(60, 90, 0, 1, program=0, track=3), Note(64, 90, 1, 2, program=0, track=3),
             Note(36, 100, 0, 0.1, is_drum=True, track=4)]
    parts = arrange(Piece(notes, track_names=["", "Melody", "Bass", "Pad", "Drums"]))
    summary = {(p.role, p.program, p.name, len(p.notes)) for p in parts}
    assert summary == {("lead", 80, "Melody", 1), ("bass", 33, "Bass", 1), ("harmony", 0, "Pad", 2),
                       ("drums", None, "drums", 1)}  # the file's own drums: nothing generated


def test_parts_carry_the_controls_of_their_channels() -> None:
    bend = Control(0.5, bytes([0xE0, 0, 0x60]), channel=1)
    other = Control(0.5, bytes([0xB0, 1, 90]), channel=2)
    hat = Control(0.1, bytes([0xB0, 4, 20]), channel=9)
    stream = [Note(72, 90, 0.0, 1.0, track=1, channel=1), Note(60, 90, 0.0, 1.0, track=1, channel=1),
              Note(40, 90, 0.0, 1.0, track=1, channel=1), Note(42, 90, 0.0, 0.1, is_drum=True, track=3, channel=9)]
    parts = {p.role: p for p in arrange(Piece(stream, controls=[bend, other, hat]))}
    assert {role: p.controls for role, p in parts.items()} == {
        "lead": (bend,), "harmony": (bend,), "bass": (bend,), "drums": (hat,)}
    # A format-0 file: one track, a channel per instrument; each part gets its own channel's controls.
    two = [Note(72, 90, 0.0, 1.0, program=80, channel=1), Note(40, 90, 0.0, 1.0, program=33, channel=2)]
    parts = {p.role: p for p in arrange(Piece(two, controls=[bend, other]), drums=False)}
    assert parts["lead"].controls == (bend,) and parts["bass"].controls == (other,)


def test_drums_can_be_left_out() -> None:
    parts = arrange(Piece(chorale()), drums=False)
    assert {p.role for p in parts} == {"lead", "harmony", "bass"}


def grid(notes: list[Note], beat: float) -> dict[int, list[tuple[float, int]]]:
    bars = defaultdict(list)
    for n in notes:
        b = round(n.start / beat, 3)
        bars[int(b // 4)].append((round(b % 4, 3), n.pitch))
    return bars


def eighths(bars: int, beat: float) -> list[Note]:
    return [Note(72 + k % 5, 90, (4 * bar + k / 2) * beat, (4 * bar + k / 2 + 0.4) * beat)
            for bar in range(bars) for k in range(8)]


def test_4_4_groove_with_fills_closing_each_phrase() -> None:
    beat = 0.5
    drums = generate_drums(Piece([*eighths(8, beat), Note(40, 90, 0.0, 16.0)]))
    assert all(n.is_drum for n in drums)
    bars = grid(drums, beat)
    assert sorted(bars) == list(range(8))
    for bar, hits in bars.items():
        assert (0.0, KICK) in hits and (2.0, KICK) in hits and (1.0, SNARE) in hits
        fill = [key for t, key in hits if t >= 3.0]
        if bar % 4 == 3:
            assert any(key in TOMS for key in fill)  # phrase end: snare and toms on the last beat
        else:
            assert (3.0, SNARE) in hits and CLOSED_HAT in fill
    assert (0.0, CRASH) in bars[4] and (0.0, CRASH) not in bars[0]


def test_no_drums_in_silent_bars_or_after_the_music_ends() -> None:
    beat = 0.5
    music = [*eighths(2, beat), Note(60, 90, 12 * beat, 14 * beat)]  # bars 0-1, a rest, a note in bar 3
    drums = generate_drums(Piece(music))
    assert set(grid(drums, beat)) == {0, 1, 3}
    assert max(n.start for n in drums) < 14 * beat


def test_other_metres_and_tempo_changes() -> None:
    beat = 0.5
    waltz = [Note(70, 90, k * beat, (k + 1) * beat) for k in range(12)]
    drums = generate_drums(Piece(waltz, time_signatures=[TimeSignature(0.0, 0.0, 3, 4)]))
    kicks = sorted(round(n.start / beat, 3) for n in drums if n.pitch == KICK)
    assert kicks == [0.0, 3.0, 6.0, 9.0]  # once a bar
    jig = [Note(70, 90, k * beat / 2, (k + 1) * beat / 2) for k in range(24)]  # 6/8, eighths
    drums = generate_drums(Piece(jig, time_signatures=[TimeSignature(0.0, 0.0, 6, 8)]))
    snares = sorted(round(n.start / beat, 3) for n in drums if n.pitch == SNARE)
    assert 1.5 in snares and 4.5 in snares  # the second dotted-quarter beat of each bar
    # 120 qpm for two bars, then 60 qpm: bar 2's downbeat is at 4 s and its third beat at 6 s
    slow = [TempoChange(0.0, 0.0, 120.0), TempoChange(4.0, 8.0, 60.0)]
    piece = Piece([Note(70, 90, 0.0, 12.0)], tempos=slow)
    kicks = [round(n.start, 6) for n in generate_drums(piece) if n.pitch == KICK]
    assert kicks == [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0]
