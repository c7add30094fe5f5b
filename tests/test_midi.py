"""Reading, writing and quantizing MIDI: the cases real files throw at a reader."""

from __future__ import annotations

from pathlib import Path

import mido
import numpy as np
import pytest
from midi_factory import notes_track, simple_song, tempo, time_signature, with_velocity_over_127, write_song

from chiptune_forge.errors import MidiError
from chiptune_forge.midi import (
    Control,
    Note,
    Piece,
    TempoChange,
    read_midi,
    split_and_quantize,
    write_midi,
)


def on(note: int, vel: int = 90, ch: int = 0) -> mido.Message:
    return mido.Message("note_on", note=note, velocity=vel, channel=ch)


def off(note: int, ch: int = 0) -> mido.Message:
    return mido.Message("note_off", note=note, velocity=0, channel=ch)


def test_format0_velocity_zero_and_seconds(tmp_path: Path) -> None:
    path = write_song(tmp_path / "f0.mid", [[tempo(0, 60), (0, on(60)), (480, on(60, 0)), (480, on(62)),
                                               (960, off(62))]], file_type=0)
    piece = read_midi(path)
    assert [(n.pitch, n.start, n.end) for n in piece.notes] == [(60, 0.0, 1.0), (62, 1.0, 2.0)]
    assert piece.qpm == pytest.approx(60)


def test_tempo_in_another_track_applies_to_all(tmp_path: Path) -> None:
    # Format 1: the tempo change sits in the conductor track; the notes in track 2 must follow it.
    path = write_song(tmp_path / "f1.mid", [
        [tempo(0, 120), tempo(960, 60)],
        notes_track([(60, 0, 8), (62, 8, 12)]),  # steps of 120 ticks: note 2 starts at tick 960
    ])
    piece = read_midi(path)
    first, second = piece.notes
    assert first.end == pytest.approx(1.0)
    assert second.start == pytest.approx(1.0)
    assert second.end == pytest.approx(2.0)  # one beat at 60 qpm
    assert [t.qpm for t in piece.tempos] == pytest.approx([120, 60])


def test_tracks_disagreeing_on_tempo_are_merged(tmp_path: Path) -> None:
    path = write_song(tmp_path / "disagree.mid", [
        [tempo(0, 120)],
        [tempo(480, 90), (0, on(60)), (960, off(60))],
    ])
    piece = read_midi(path)
    assert [round(t.qpm) for t in piece.tempos] == [120, 90]
    assert piece.notes[0].end == pytest.approx(0.5 + 60 / 90)


def test_overlapping_same_pitch_restrike(tmp_path: Path) -> None:
    path = write_song(tmp_path / "overlap.mid", [[(0, on(60)), (240, on(60)), (480, off(60)), (720, off(60))]])
    piece = read_midi(path)
    assert [(n.start, n.end) for n in piece.notes] == [(0.0, 0.25), (0.25, 0.5)]


def test_sustain_pedal_extends_notes(tmp_path: Path) -> None:
    cc = mido.Message("control_change", control=64, value=127)
    up = mido.Message("control_change", control=64, value=0)
    path = write_song(tmp_path / "pedal.mid", [[(0, cc), (0, on(60)), (240, off(60)), (960, up)]])
    piece = read_midi(path)
    assert piece.notes[0].end == pytest.approx(1.0)


def test_drums_and_programs(tmp_path: Path) -> None:
    prog = mido.Message("program_change", program=33, channel=1)
    path = write_song(tmp_path / "drums.mid", [[(0, prog), (0, on(40, ch=1)), (480, off(40, ch=1)),
                                                  (0, on(36, ch=9)), (120, off(36, ch=9))]])
    piece = read_midi(path)
    bass = next(n for n in piece.notes if n.pitch == 40)
    kick = next(n for n in piece.notes if n.pitch == 36)
    assert bass.program == 33 and not bass.is_drum
    assert kick.is_drum
    assert [p.pitch.tolist() for p in split_and_quantize(piece)] == [[40]]


def test_write_and_read_back(tmp_path: Path) -> None:
    notes = [Note(60, 100, 0.0, 0.5), Note(64, 80, 0.25, 1.0), Note(38, 90, 0.5, 0.75, is_drum=True)]
    piece = Piece(notes, [TempoChange(0.0, 0.0, 120.0)])
    write_midi(piece, tmp_path / "out.mid")
    back = read_midi(tmp_path / "out.mid")
    got = sorted((n.pitch, n.velocity, round(n.start, 4), round(n.end, 4), n.is_drum) for n in back.notes)
    assert got == sorted((n.pitch, n.velocity, n.start, n.end, n.is_drum) for n in notes)


def test_a_note_that_ends_where_it_starts_is_kept_one_tick_long(tmp_path: Path) -> None:
    """Drum tracks often switch a hit off at the tick it starts; the hit must not vanish."""
    path = write_song(tmp_path / "zero.mid", [
        [tempo(0, 120)],
        [(0, on(36, ch=9)), (0, off(36, ch=9)), (480, on(60)), (480, off(60)), (960, on(64))],  # 64 never ends
    ])
    piece = read_midi(path)
    got = sorted((n.pitch, n.is_drum, n.start) for n in piece.notes)
    assert got == [(36, True, 0.0), (60, False, 0.5), (64, False, 1.0)]
    tick = 0.5 / 480  # at 120 qpm, 480 ticks to the beat
    assert all(n.end == pytest.approx(n.start + tick) for n in piece.notes)


def test_a_pitch_struck_twice_at_once_is_one_note(tmp_path: Path) -> None:
    """Doubled parts merged onto one channel strike a pitch twice on the same tick: one note, not a blip."""
    path = write_song(tmp_path / "doubled.mid", [
        [tempo(0, 120)], [(0, on(60)), (0, on(60)), (480, off(60)), (480, off(60))]])
    notes = read_midi(path).notes
    assert [(n.pitch, n.start, n.end) for n in notes] == [(60, 0.0, 0.5)]


def test_writing_refuses_a_pitch_outside_midi_and_writes_nothing(tmp_path: Path) -> None:
    piece = Piece([Note(60, 100, 0.0, 0.5), Note(128, 100, 0.5, 1.0)], [TempoChange(0.0, 0.0, 120.0)])
    with pytest.raises(ValueError, match="pitch 128"):
        write_midi(piece, tmp_path / "out.mid")
    assert not (tmp_path / "out.mid").exists()


def test_controls_are_kept_for_instruments_and_written_back(tmp_path: Path) -> None:
    mod = mido.Message("control_change", control=1, value=70, channel=3)
    pedal = mido.Message("control_change", control=64, value=127, channel=3)
    bend = mido.Message("pitchwheel", pitch=4096, channel=3)
    pressure = mido.Message("aftertouch", value=50, channel=9)
    path = write_song(tmp_path / "controls.mid", [
        [tempo(0, 60)],
        [(0, mod), (0, on(60, ch=3)), (240, bend), (480, pedal), (960, off(60, ch=3))],
        [(0, on(36, ch=9)), (120, pressure), (240, off(36, ch=9))],
    ])
    piece = read_midi(path)
    assert piece.controls == [
        Control(0.0, bytes([0xB0, 1, 70]), 3),
        Control(0.25, bytes([0xD0, 50]), 9),
        Control(0.5, bytes([0xE0, 0x00, 0x60]), 3),  # 4096 above centre: 0x3000 as LSB, MSB
        Control(1.0, bytes([0xB0, 64, 127]), 3),
    ]
    assert {(n.pitch, n.channel) for n in piece.notes} == {(60, 3), (36, 9)}
    assert next(n for n in piece.notes if n.pitch == 60).end == pytest.approx(2.0)  # pedal down till the end
    write_midi(piece, tmp_path / "back.mid")
    back = read_midi(tmp_path / "back.mid")
    # Written on the channels the writer gives each group, and read back as applying to those notes.
    channel_of = {n.pitch: n.channel for n in back.notes}
    assert sorted((round(c.time, 4), c.data, c.channel) for c in back.controls) == sorted(
        (c.time, c.data, channel_of[60 if c.channel == 3 else 36]) for c in piece.controls)


def test_split_on_tempo_and_time_signature(tmp_path: Path) -> None:
    # 4 bars of 4/4 at 120, then 3/4 at 120 from step 64, then 90 qpm from step 112.
    notes = [(60, s, s + 2) for s in range(0, 160, 4)]
    path = write_song(tmp_path / "split.mid", [
        [tempo(0, 120), time_signature(0, 4, 4), time_signature(64 * 120, 3, 4), tempo(112 * 120, 90)],
        notes_track(notes),
    ])
    parts = split_and_quantize(read_midi(path))
    assert [(p.num_steps, p.numerator, p.denominator, round(p.qpm)) for p in parts] == [
        (64, 4, 4, 120), (48, 3, 4, 120), (46, 3, 4, 90)]  # the last note ends at step 158
    assert parts[1].steps_per_bar == 12
    assert parts[2].start.tolist() == list(range(0, 48, 4))


def test_a_gradual_ritardando_stays_one_part_within_the_tempo_tolerance(tmp_path: Path) -> None:
    notes = [(60, s, s + 2) for s in range(0, 128, 4)]
    ramp = [tempo(step * 120, qpm) for step, qpm in ((0, 120), (32, 116), (40, 113), (48, 110), (64, 120))]
    path = write_song(tmp_path / "rit.mid", [[*ramp, tempo(96 * 120, 90)], notes_track(notes)])
    piece = read_midi(path)
    assert [p.num_steps for p in split_and_quantize(piece, tempo_tolerance=0.1)] == [96, 30]  # only 120 -> 90
    assert [round(p.qpm) for p in split_and_quantize(piece, tempo_tolerance=0.1)] == [120, 90]
    assert len(split_and_quantize(piece)) == 6  # the reference rule: a part at every tempo change

    # A metre change starts a part whose tempo is the reference for what follows.
    path = write_song(tmp_path / "metre.mid", [
        [tempo(0, 100), tempo(64 * 120, 108), time_signature(64 * 120, 3, 4), tempo(128 * 120, 115)],
        notes_track([(60, s, s + 2) for s in range(0, 160, 4)])])
    parts = split_and_quantize(read_midi(path), tempo_tolerance=0.1)
    assert [(p.num_steps, p.numerator, round(p.qpm)) for p in parts] == [(64, 4, 100), (94, 3, 108)]


def test_quantize_rounds_to_nearest_step_and_stretches_zero_length(tmp_path: Path) -> None:
    # Ticks: 120 per step. Start at 170 ticks (1.42 steps -> 1), end at 190 (1.58 -> 2); 300..310 -> 3..3 -> 3..4.
    path = write_song(tmp_path / "q.mid", [[tempo(0, 120)], [(170, on(60)), (190, off(60)), (300, on(62)),
                                                             (310, off(62))]])
    part = split_and_quantize(read_midi(path))[0]
    assert list(zip(part.pitch.tolist(), part.start.tolist(), part.end.tolist(), strict=True)) == [
        (60, 1, 2), (62, 3, 4)]


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("empty.mid", b"", "empty"),
    ("text.mid", b"this is not a MIDI file\n", "not a MIDI file"),
    ("random.mid", b"MThd" + bytes(np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8)), "broken"),
])
def test_broken_files_raise_midi_error(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(MidiError, match=reason) as info:
        read_midi(path)
    assert name in str(info.value)


def test_data_bytes_over_127_are_read_as_127_with_a_warning(tmp_path: Path) -> None:
    good = read_midi(simple_song(tmp_path / "good.mid"))
    assert good.warnings == []
    piece = read_midi(with_velocity_over_127(simple_song(tmp_path / "loud.mid")))
    assert piece.warnings == ["data bytes above 127 (not valid MIDI) were read as 127"]
    assert {n.velocity for n in good.notes} == {90}
    assert sorted(n.velocity for n in piece.notes) == [90] * (len(good.notes) - 1) + [127]
    # mido reports a bad byte in a system-exclusive message differently from one in a note: the same outcome
    data = (tmp_path / "good.mid").read_bytes()
    track = data.index(b"MTrk")
    sysex = bytes([0x00, 0xF0, 0x04, 0x43, 0x80, 0x10, 0xF7])  # delta 0, F0, length 4, a data byte of 0x80
    length = int.from_bytes(data[track + 4:track + 8], "big") + len(sysex)
    spoiled = data[:track + 4] + length.to_bytes(4, "big") + sysex + data[track + 8:]
    (tmp_path / "sysex.mid").write_bytes(spoiled)
    assert read_midi(tmp_path / "sysex.mid").warnings == piece.warnings


def test_truncated_file(tmp_path: Path) -> None:
    good = simple_song(tmp_path / "good.mid").read_bytes()
    path = tmp_path / "truncated.mid"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(MidiError, match=r"truncated\.mid"):
        read_midi(path)


def test_absurd_tempo(tmp_path: Path) -> None:
    path = write_song(tmp_path / "tempo.mid", [[(0, mido.MetaMessage("set_tempo", tempo=1)), (0, on(60)),
                                                  (480, off(60))]])
    with pytest.raises(MidiError, match="absurd tempo"):
        read_midi(path)


def test_reads_corpus_files(corpus_dir: Path) -> None:
    files = sorted(corpus_dir.glob("*.mid"))[:5]
    assert len(files) == 5
    for f in files:
        piece = read_midi(f)
        assert piece.notes, f
        assert all(0 <= n.pitch <= 127 and n.end > n.start for n in piece.notes)
