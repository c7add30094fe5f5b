"""Loop assembly: bar lines from the maps, exact frame counts, and seams that continue the music.

The renderer here is a toy numpy synth with what makes loops hard: releases that ring past note-offs and
a feedback echo whose tail lasts for seconds. Other test modules import `toy_render` and `make_piece`.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chiptune_forge import loops
from chiptune_forge.errors import ChiptuneError
from chiptune_forge.loops import (
    END_GUARD_SECONDS,
    JINGLE_FADE_SECONDS,
    bar_lines,
    loop_piece,
    piece_bar_lines,
    plan_loop,
    render_track,
)
from chiptune_forge.midi import Control, Note, Piece, TempoChange, TimeSignature

RATE = 32000


def toy_render(piece: Piece, rate: int, release: float = 0.1, echo_delay: float = 0.12,
               feedback: float = 0.5, tail: float = 1.5) -> np.ndarray:
    """Sine voices with smooth attack/release, panned by pitch, through a stereo feedback echo.

    Deterministic and time-exact: a note starts at frame round(start * rate).
    """
    frames = round((piece.end_time + tail) * rate)
    dry = np.zeros((frames, 2))
    rel = round(release * rate)
    for n in piece.notes:
        s, e = round(n.start * rate), round(n.end * rate)
        if s >= frames:
            continue
        t = np.arange(min(e - s + rel, frames - s))
        env = np.clip(t / 64.0, 0.0, 1.0)
        fall = t >= e - s
        env[fall] *= 0.5 * (1 + np.cos(np.pi * (t[fall] - (e - s)) / rel))
        wave = np.sin(2 * np.pi * 440.0 * 2 ** ((n.pitch - 69) / 12) * t / rate) * env * n.velocity / 127 * 0.3
        pan = (n.pitch % 12) / 11.0
        dry[s:s + len(t), 0] += wave * (1 - pan)
        dry[s:s + len(t), 1] += wave * pan
    wet = dry.copy()
    d = round(echo_delay * rate)
    for k in range(d, frames, d):
        wet[k:k + d] += feedback * wet[k - d:k][: len(wet[k:k + d])]
    return wet.astype(np.float32)


def make_piece(bars: int = 4, qpm: float = 120.0, numerator: int = 4, denominator: int = 4,
               seed: int = 0) -> Piece:
    """A melody of quarter-ish notes plus one held bass note per bar, every note inside its bar."""
    rng = np.random.default_rng(seed)
    spb = 60.0 / qpm
    bar_beats = numerator * 4 / denominator
    notes = []
    for b in range(bars):
        b0 = b * bar_beats
        notes.append(Note(40 + b % 5, 90, b0 * spb, (b0 + bar_beats * 0.9) * spb))
        beat = 0.0
        while beat < bar_beats - 0.25:
            dur = min(float(rng.choice([0.25, 0.5, 1.0])), bar_beats - beat)
            notes.append(Note(int(rng.integers(60, 80)), 100, (b0 + beat) * spb, (b0 + beat + dur) * spb))
            beat += dur
    return Piece(notes, [TempoChange(0.0, 0.0, qpm)], [TimeSignature(0.0, 0.0, numerator, denominator)])


def max_jump(a: np.ndarray) -> float:
    return float(np.max(np.abs(np.diff(a.astype(np.float64), axis=0))))


def seam_jump(track) -> float:
    """The jump a player makes from the last loop frame back to the loop start."""
    a = track.audio.astype(np.float64)
    return float(np.max(np.abs(a[track.loop_start] - a[track.loop_end - 1])))


def never_render(piece: Piece, rate: int) -> np.ndarray:
    raise AssertionError("a bad request must be refused before rendering")


# ------------------------------------------------------------------------------------------- bar lines


def test_bar_lines_follow_time_signature_changes():
    sigs = [TimeSignature(0.0, 0.0, 4, 4), TimeSignature(4.0, 8.0, 3, 4), TimeSignature(7.0, 14.0, 6, 8)]
    piece = Piece([Note(60, 100, 0.0, 1.0)], [TempoChange(0.0, 0.0, 120.0)], sigs)
    assert bar_lines(piece, 20.0) == [0.0, 4.0, 8.0, 11.0, 14.0, 17.0, 20.0]


def test_mid_bar_signature_change_starts_a_new_bar():
    sigs = [TimeSignature(0.0, 0.0, 4, 4), TimeSignature(3.0, 6.0, 3, 4)]
    piece = Piece([Note(60, 100, 0.0, 1.0)], [TempoChange(0.0, 0.0, 120.0)], sigs)
    assert bar_lines(piece, 12.0) == [0.0, 4.0, 6.0, 9.0, 12.0]


def test_last_bar_line_tolerates_a_late_note_off():
    piece = make_piece(bars=3)
    late = Note(72, 100, 5.5, 6.0 + 0.01)  # 1/50 beat past the end of bar 3 (120 qpm: 2 s per bar)
    assert piece_bar_lines(Piece([*piece.notes, late], piece.tempos, piece.time_signatures))[-1] == 12.0
    held = Note(72, 100, 5.5, 6.5)  # a quarter note past: a fourth bar
    assert piece_bar_lines(Piece([*piece.notes, held], piece.tempos, piece.time_signatures))[-1] == 16.0


# --------------------------------------------------------------------------------------- frame counts


def test_loop_length_is_the_body_rounded_once():
    piece = make_piece(bars=6, qpm=137.0)
    track = render_track(piece, toy_render, RATE, intro_bars=2, bars=3)
    assert track.loop_length == round(3 * 4 * 60 / 137.0 * RATE)
    assert track.loop_start == round(2 * 4 * 60 / 137.0 * RATE)
    assert track.frames == track.loop_start + track.loop_length
    assert (track.bars, track.intro_bars, track.qpm) == (3, 2, 137.0)


def test_tempo_change_inside_the_body():
    piece = make_piece(bars=4)
    piece.tempos = [TempoChange(0.0, 0.0, 120.0), TempoChange(5.0, 10.0, 90.0)]  # beat 10: bar 3, beat 3
    piece.notes = [Note(60, 100, 0.0, 0.5), Note(64, 100, 6.0, 6.5)]  # ends in bar 4 at 90 qpm
    piece.time_signatures = [TimeSignature(0.0, 0.0, 4, 4), TimeSignature(4.0, 8.0, 3, 4)]
    plan = plan_loop(piece, RATE, intro_bars=1)
    assert plan.bars == 3  # 4/4 bar 2, then 3/4 from beat 8: bars at 8, 11, 14
    assert plan.body_frames == round((4 * 0.5 + 2 * 0.5 + 4 * 60 / 90) * RATE)
    # Every copy carries the body's tempo and signature maps, placed body_frames apart.
    built = loop_piece(piece, plan, RATE)
    shift, span = plan.body_frames / RATE, plan.body_end_beat - plan.body_start_beat
    beats = np.linspace(plan.body_start_beat, plan.body_end_beat - 0.01, 9)
    for k in range(plan.copies):
        assert np.allclose(built.beats_to_seconds(beats + k * span), piece.beats_to_seconds(beats) + k * shift,
                           atol=0.5 / RATE)
    assert [(s.beat, s.numerator) for s in built.time_signatures[:3]] == [(0.0, 4), (8.0, 3), (4 + span, 4)]


@settings(max_examples=25, deadline=None)
@given(qpm=st.floats(60, 240), numerator=st.sampled_from([2, 3, 4, 5, 6, 7]),
       denominator=st.sampled_from([4, 8]), intro=st.integers(0, 3), body=st.integers(1, 4),
       rate=st.sampled_from([32000, 44100, 48000]))
def test_plan_arithmetic(qpm, numerator, denominator, intro, body, rate):
    piece = make_piece(bars=intro + body + 1, qpm=qpm, numerator=numerator, denominator=denominator)
    plan = plan_loop(piece, rate, intro_bars=intro, bars=body)
    bar_seconds = numerator * 4 / denominator * 60 / qpm
    assert plan.body_frames == round(body * bar_seconds * rate)
    assert abs(plan.intro_frames - intro * bar_seconds * rate) <= 0.5 + 1e-6
    assert plan.kept >= 1 and plan.kept * body * bar_seconds >= 8.0 and plan.copies == plan.kept + 2


# ----------------------------------------------------------------------------------- seamless by design


def fading_render(piece: Piece, rate: int) -> np.ndarray:
    """A renderer that treats the end of a piece specially (as the arranger does with its last bars)."""
    audio = toy_render(piece, rate)
    end = round(piece.end_time * rate)
    audio[end - rate // 2:end] *= np.linspace(1.0, 0.0, rate // 2, dtype=np.float32)[:, None]
    return audio


@pytest.mark.parametrize("render", [toy_render, fading_render])
def test_looped_playback_equals_the_music_repeated(render):
    """Intro + body, body, body ... as a player loops the file is what rendering the repeats gives."""
    piece = make_piece(bars=3, seed=3)
    track = render_track(piece, render, RATE, intro_bars=1)
    s, n = track.loop_start, track.loop_length
    assert (s, n) == (64000, 128000)  # 120 qpm, 4/4: 2 s per bar, exactly
    body = [x for x in piece.notes if x.start >= 2.0]
    repeats = [x for x in piece.notes if x.start < 2.0]
    for k in range(4):
        repeats += [Note(x.pitch, x.velocity, x.start + 4.0 * k, x.end + 4.0 * k) for x in body]
    reference = render(Piece(repeats, piece.tempos, piece.time_signatures), RATE)
    played = np.concatenate([track.audio, *[track.audio[s:]] * 3])
    # The intro up to its final crossfade is the music itself.
    assert np.allclose(played[: s - 320], reference[: s - 320], atol=1e-6)
    # From the second pass on, every pass is exactly what follows a body, seams included.
    assert np.allclose(played[s + n: s + 3 * n], reference[s + n: s + 3 * n], atol=1e-5)


@pytest.mark.parametrize("render", [toy_render, fading_render])
def test_the_copy_after_the_kept_one_only_runs_past_the_guard(render, monkeypatch):
    """A long body's last copy is cut a few seconds in; the file is what rendering all of it gives."""
    piece = make_piece(bars=6, seed=9)  # a 12 s body: 3 copies
    plan = plan_loop(piece, RATE)
    last = plan.body_start_seconds + (plan.copies - 1) * plan.body_frames / RATE
    built = loop_piece(piece, plan, RATE)
    assert last + END_GUARD_SECONDS <= built.end_time < last + END_GUARD_SECONDS + 2.0  # notes last 2 s at most
    track = render_track(piece, render, RATE)
    monkeypatch.setattr(loops, "END_GUARD_SECONDS", 1e9)
    whole = render_track(piece, render, RATE)
    assert len(loop_piece(piece, plan, RATE).notes) > len(built.notes)
    assert np.array_equal(track.audio, whole.audio)


def test_a_body_opening_with_a_rest_still_runs_past_the_guard():
    piece = make_piece(bars=6, seed=10)
    piece.notes = [n for n in piece.notes if n.start % 12.0 >= 6.0]  # each 6-bar span opens with 6 s of rest
    plan = plan_loop(piece, RATE)
    last = plan.body_start_seconds + (plan.copies - 1) * plan.body_frames / RATE
    assert loop_piece(piece, plan, RATE).end_time >= last + END_GUARD_SECONDS


def test_seam_jump_no_larger_than_the_body():
    piece = make_piece(bars=5, qpm=137.0, seed=1)
    # A note ringing over the body's last bar line, and the echo, run across the seam.
    piece.notes.append(Note(67, 127, 4 * 4 * 60 / 137.0 - 0.05, 5 * 4 * 60 / 137.0 + 0.5))
    track = render_track(piece, toy_render, RATE, intro_bars=1)
    body = track.audio[track.loop_start:]
    assert seam_jump(track) <= max_jump(body)
    # The first pass from the intro into the body is continuous too.
    assert max_jump(track.audio[track.loop_start - 1: track.loop_start + 1]) <= max_jump(body)


def test_notes_stop_at_their_section_bar_line():
    piece = make_piece(bars=4)
    piece.notes.append(Note(50, 100, 1.5, 2.5))  # intro note tied into the body
    piece.notes.append(Note(52, 100, 7.5, 9.0))  # body note held past the body's end (bar 4 -> bar 5)
    piece.notes.append(Note(53, 100, 8.0, 9.0))  # starts after the body: dropped
    plan = plan_loop(piece, RATE, intro_bars=1, bars=3)
    built = loop_piece(piece, plan, RATE)
    assert Note(50, 100, 1.5, 2.0) in built.notes
    assert Note(52, 100, 7.5, 8.0) in built.notes
    assert all(x.pitch != 53 for x in built.notes)
    shift = plan.body_frames / RATE
    assert any(x.pitch == 52 and x.start == pytest.approx(7.5 + shift) for x in built.notes)
    assert [t.beat for t in built.tempos] == [0.0] + [4 + 12 * k for k in range(1, plan.copies)]


def test_controls_repeat_with_the_body_and_each_copy_starts_from_the_body_state():
    piece = make_piece(bars=4)  # 2 s bars
    volume = Control(0.0, bytes([0xB0, 7, 100]))
    quiet = Control(6.5, bytes([0xB0, 7, 60]))  # the body turns the volume down in its last bar...
    bend = Control(7.0, bytes([0xE0, 0x7F, 0x7F]))  # ...and leaves the pitch bent
    late = Control(8.5, bytes([0xB0, 1, 10]))  # after the body: dropped
    piece.controls = [volume, quiet, bend, late]
    plan = plan_loop(piece, RATE, intro_bars=1, bars=3)
    built = loop_piece(piece, plan, RATE)
    shift = plan.body_frames / RATE
    last = plan.copies - 1
    last_end = max(n.end for n in built.notes if n.start >= 2.0 + last * shift - 1e-9)
    expected = [volume, quiet, bend]
    for k in range(1, plan.copies):
        start = 2.0 + k * shift
        expected += [Control(start, bytes([0xB0, 7, 100])), Control(start, bytes([0xE0, 0x00, 0x40]))]  # restored
        # the last copy runs only a few seconds: it keeps the controls up to its last note-off
        expected += [c.moved(k * shift) for c in (quiet, bend) if k < last or c.time + k * shift <= last_end]
    assert last_end < 8.0 + last * shift  # the last copy was cut short
    assert [(round(c.time, 9), c.data) for c in built.controls] == [(round(c.time, 9), c.data) for c in expected]


def test_short_render_is_padded():
    piece = make_piece(bars=2)
    track = render_track(piece, lambda p, r: toy_render(p, r, tail=0.0)[: r], RATE)
    assert track.frames == track.loop_length == 4 * RATE
    assert not np.any(track.audio[RATE:])


# ---------------------------------------------------------------------------------------------- jingles


def test_jingle_ends_with_its_tail_and_fades_to_silence():
    piece = make_piece(bars=2)
    track = render_track(piece, toy_render, RATE, loop=False)
    assert not track.looping and track.loop_start is None and track.loop_end is None
    music_end = round(piece.end_time * RATE)
    assert track.frames > music_end + round(0.1 * RATE)  # the release and echo ring on
    assert np.all(track.audio[-1] == 0.0)
    fade = round(JINGLE_FADE_SECONDS * RATE)
    level = np.max(np.abs(track.audio[-fade:]), axis=1)
    assert level[-fade // 10:].max() < level[: fade // 10].max() * 0.1
    assert track.bars == 2


def test_jingle_can_keep_the_first_bars():
    piece = make_piece(bars=4)
    track = render_track(piece, toy_render, RATE, loop=False, bars=2)
    assert track.bars == 2
    assert track.frames < round(5.0 * RATE)


# ------------------------------------------------------------------------------------------ bad requests


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"intro_bars": 2, "bars": 3}, "longer than the piece (4 bars)"),
    ({"intro_bars": 4}, "leaves no body"),
    ({"intro_bars": 1.5}, "intro of 1.5 bars does not end on a bar line"),
    ({"bars": 2.25}, "body of 2.25 bars does not end on a bar line"),
    ({"bars": 0}, "at least 1 bar"),
    ({"intro_bars": -1}, "cannot be negative"),
    ({"sample_rate": 12345}, "unsupported sample rate 12345 Hz"),
    ({"loop": False, "intro_bars": 1}, "needs a looping track"),
    ({"loop": False, "bars": 9}, "the piece has 4 bars"),
])
def test_bad_requests_fail_before_rendering(kwargs, message):
    args = {"sample_rate": RATE, **kwargs}
    with pytest.raises(ChiptuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render_track(make_piece(bars=4), never_render, **args)


def test_empty_piece_is_refused():
    with pytest.raises(ChiptuneError, match="no notes"):
        render_track(Piece([]), never_render, RATE)


@pytest.mark.parametrize("loop", [True, False])
def test_too_long_music_is_put_on_bars_only_when_bars_chose_it(loop: bool) -> None:
    """A piece over the length limit is the MIDI's fault unless `bars` asked for that much of it."""
    piece = make_piece(bars=160, qpm=30.0)  # 8 s bars: 1280 s
    with pytest.raises(loops.RequestError, match="at most 20 minutes") as whole:
        loops.check_request(piece, RATE, loop=loop)
    assert whole.value.key == "midi"
    with pytest.raises(loops.RequestError, match="at most 20 minutes") as chosen:
        loops.check_request(piece, RATE, loop=loop, bars=155)
    assert chosen.value.key == "bars"
    loops.check_request(piece, RATE, loop=loop, bars=100)
