"""Arrangement: turn a piece into parts with roles (lead, harmony, bass, drums) for the renderer.

The model writes one polyphonic stream; a game track wants a melody, a bass line and accompaniment on
different instruments. A single pitched stream is split into voices (`split_voices`); a multi-track MIDI
keeps its tracks, each taking a role by register. Drums come from the file's drum channel, or are made by
rule from the tempo map, the metre and how busy each bar is (`generate_drums`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .midi import DRUM_CHANNEL, Control, Note, Piece

ROLES = ("lead", "harmony", "bass", "drums")
CHORD_WINDOW = 0.02  # seconds: onsets this close form one chord
PHRASE_BARS = 4  # drum fills close every 4th bar
BASS_GAP = 7  # semitones below the melody a lone note must be to count as bass

KICK, SNARE, CLOSED_HAT, OPEN_HAT, CRASH = 36, 38, 42, 46, 49
TOMS = (50, 48, 45, 41)  # high to low


@dataclass(frozen=True)
class Part:
    """Notes for one role. `program` is set for a track kept from a multi-track file, so a preset can map
    that program to an instrument; parts split from one stream and generated drums have None. `controls`
    are the source track's controls (pedal, bends, CCs) for instruments that take MIDI."""

    role: str
    notes: tuple[Note, ...]
    program: int | None = None
    name: str = ""
    controls: tuple[Control, ...] = ()


def arrange(piece: Piece, drums: bool = True) -> list[Part]:
    """Parts for a piece, deterministically.

    One pitched track/program: split into lead, harmony and bass voices. Several: each keeps its notes;
    the highest (by median pitch) is the lead, the lowest the bass, the rest harmony. Drum-channel notes
    are the drums part; with none and `drums` set, a drum part is generated. Each part carries the
    controls of the MIDI channels its notes come from.
    """
    groups: dict[tuple[int, int], list[Note]] = {}
    for note in piece.notes:
        if not note.is_drum:
            groups.setdefault((note.track, note.program), []).append(note)

    def controls(notes: Sequence[Note]) -> tuple[Control, ...]:
        channels = {n.channel for n in notes}
        return tuple(c for c in piece.controls if c.channel in channels)

    parts: list[Part] = []
    if len(groups) == 1:
        lead, harmony, bass = split_voices(next(iter(groups.values())))
        shared = controls(next(iter(groups.values())))
        parts += [Part(role, tuple(notes), None, role, shared)
                  for role, notes in (("lead", lead), ("harmony", harmony), ("bass", bass)) if notes]
    elif groups:
        ranked = sorted(groups.items(), key=lambda kv: (-_quantile([n.pitch for n in kv[1]], 0.5), kv[0]))
        for rank, ((track, program), notes) in enumerate(ranked):
            role = "lead" if rank == 0 else ("bass" if rank == len(ranked) - 1 else "harmony")
            name = piece.track_names[track] if track < len(piece.track_names) else ""
            parts.append(Part(role, tuple(notes), program, name or f"track {track}", controls(notes)))
    drum_notes = tuple(n for n in piece.notes if n.is_drum)
    if not drum_notes and drums and groups:
        drum_notes = tuple(generate_drums(piece))
    if drum_notes:
        parts.append(Part("drums", drum_notes, None, "drums", controls(drum_notes)))
    return parts


def split_voices(notes: Sequence[Note]) -> tuple[list[Note], list[Note], list[Note]]:
    """Split one polyphonic stream into (lead, harmony, bass); lead and bass are monophonic.

    Notes are taken chord by chord (onsets within CHORD_WINDOW). The lead takes the top note of a chord
    when no lead note is sounding or when the new note is higher than the sounding one (which then moves
    to harmony); a lone note with the lead free goes to the lead unless it lies a fifth or more below the
    lead's last pitch and nearer the bass's. The bass takes the lowest remaining note below the sounding
    lead on the same terms, mirrored. Everything else is harmony. Nearness to each line's last pitch keeps
    the lines smooth.
    """
    order = sorted(range(len(notes)), key=lambda i: (notes[i].start, -notes[i].pitch))
    if not order:
        return [], [], []
    pitches = [n.pitch for n in notes]
    lead_ref, bass_ref = _quantile(pitches, 0.8), _quantile(pitches, 0.15)
    role: dict[int, str] = {}
    lead: int | None = None
    bass: int | None = None
    for chord in _chords(notes, order):
        t = notes[chord[0]].start
        if lead is not None and notes[lead].end <= t:
            lead = None
        if bass is not None and notes[bass].end <= t:
            bass = None
        rest = list(chord)
        top = notes[rest[0]].pitch
        # the lead is free: a chord's top, or a lone note unless it sits well below the melody and nearer
        # the bass line; a sounding lead only gives way to a higher note
        bass_like = top <= lead_ref - BASS_GAP and abs(top - bass_ref) < abs(top - lead_ref)
        take = (len(chord) > 1 or not bass_like) if lead is None else top > notes[lead].pitch
        if take:
            if lead is not None:
                role[lead] = "harmony"
            lead = rest.pop(0)
            role[lead] = "lead"
            lead_ref = top
        if rest:
            low = notes[rest[-1]].pitch
            below_lead = lead is None or low < notes[lead].pitch
            if bass is None:
                take = below_lead and (len(chord) > 1 or abs(low - bass_ref) < abs(low - lead_ref))
            else:
                take = below_lead and low < notes[bass].pitch
            if take:
                if bass is not None:
                    role[bass] = "harmony"
                bass = rest.pop()
                role[bass] = "bass"
                bass_ref = low
        for i in rest:
            role[i] = "harmony"
    out: dict[str, list[Note]] = {"lead": [], "harmony": [], "bass": []}
    for i in order:
        out[role[i]].append(notes[i])
    return out["lead"], out["harmony"], out["bass"]


def _quantile(values: list[int], q: float) -> float:
    """The q-quantile by linear interpolation (plain Python: numpy's percentile imports numpy.ma on first use)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _chords(notes: Sequence[Note], order: list[int]) -> list[list[int]]:
    """Group note indices (sorted by onset) into chords; each chord is sorted high to low."""
    chords: list[list[int]] = []
    for i in order:
        if chords and notes[i].start - notes[chords[-1][0]].start <= CHORD_WINDOW:
            chords[-1].append(i)
        else:
            chords.append([i])
    return [sorted(c, key=lambda i: -notes[i].pitch) for c in chords]


# ------------------------------------------------------------------------------------------------- drums


@dataclass(frozen=True)
class _Bar:
    start: float  # beats (quarter notes)
    length: float  # beats
    numerator: int
    denominator: int


def _bars(piece: Piece, end_beat: float) -> list[_Bar]:
    """Bars from the time-signature map up to `end_beat` (a new signature starts a new bar)."""
    sigs = sorted(piece.time_signatures, key=lambda s: s.beat)
    bars = []
    for k, sig in enumerate(sigs):
        stop = sigs[k + 1].beat if k + 1 < len(sigs) else end_beat
        length = sig.numerator * 4.0 / sig.denominator
        b = sig.beat
        while b < min(stop, end_beat) - 1e-9:
            bars.append(_Bar(b, min(length, stop - b), sig.numerator, sig.denominator))
            b += length
    return bars


def _beat_grid(bar: _Bar) -> tuple[list[float], float]:
    """Beat onsets within a bar (in quarter notes from the bar start) and the beat length.

    Compound metres (6/8, 9/8, 12/8) beat in dotted quarters; others beat in their denominator.
    """
    unit = 4.0 / bar.denominator
    if bar.denominator >= 8 and bar.numerator % 3 == 0 and bar.numerator > 3:
        unit *= 3
    count = max(1, round(bar.length / unit))
    return [k * unit for k in range(count)], unit


def generate_drums(piece: Piece) -> list[Note]:
    """A drum part by rule: kick on the strong beats, snare on the back beats, hi-hats subdividing the beat.

    How busy a bar is (distinct onsets per beat) picks the groove: quiet bars get hats on the beat only,
    busier ones eighths, the busiest sixteenths and an extra kick; bars where nothing sounds stay silent. The last
    bar of every PHRASE_BARS-bar phrase ends with a snare-and-tom fill, and a crash opens the next phrase.
    Hits never start after the piece's last note ends.
    """
    pitched = [n for n in piece.notes if not n.is_drum]
    if not pitched:
        return []
    end = max(n.end for n in pitched)
    starts = piece.seconds_to_beats(np.array([n.start for n in pitched]))
    stops = piece.seconds_to_beats(np.array([n.end for n in pitched]))
    onsets = np.array(sorted(set(np.round(starts, 3).tolist())))
    bars = _bars(piece, float(piece.seconds_to_beats(end)))
    hits: list[tuple[float, int, int, float]] = []  # beat, key, velocity, length in beats
    for index, bar in enumerate(bars):
        bar_end = bar.start + bar.length
        if not np.any((starts < bar_end - 1e-6) & (stops > bar.start + 1e-6)):
            continue  # nothing sounds in this bar
        inside = onsets[(onsets >= bar.start - 1e-6) & (onsets < bar_end - 1e-6)]
        beats, unit = _beat_grid(bar)
        density = len(inside) / max(len(beats), 1)
        level = 1 if density < 1.5 else (2 if density < 3.0 else 3)
        phrase_end = index % PHRASE_BARS == PHRASE_BARS - 1
        fill_from = bar.length
        if phrase_end and len(beats) >= 2:
            fill_from = beats[-2] if level == 3 else beats[-1]
            hits += _fill(bar.start + fill_from, bar.length - fill_from, unit)
        if index % PHRASE_BARS == 0 and index > 0:
            hits.append((bar.start, CRASH, 100, 2.0))
        hits += _groove(bar, beats, unit, level, fill_from)
    if not hits:
        return []
    beats = np.array([h[0] for h in hits])
    starts = piece.beats_to_seconds(beats)
    stops = piece.beats_to_seconds(beats + np.array([h[3] for h in hits]))
    notes = [Note(key, velocity, float(start), max(float(stop), float(start) + 0.01), 0, True, 0, DRUM_CHANNEL)
             for (_, key, velocity, _), start, stop in zip(hits, starts, stops, strict=True) if start < end - 1e-6]
    notes.sort(key=lambda n: (n.start, n.pitch))
    return notes


def _groove(bar: _Bar, beats: list[float], unit: float, level: int, stop: float
            ) -> list[tuple[float, int, int, float]]:
    """Kick, snare and hats for one bar, up to `stop` beats into it (where a fill takes over)."""
    hits = []
    n = len(beats)
    for k, b in enumerate(beats):
        if b >= stop - 1e-9:
            break
        at = bar.start + b
        if k == 0 or (n >= 4 and k == n // 2):
            hits.append((at, KICK, 112 if k == 0 else 100, unit / 2))
        elif n > 1 and (k % 2 == 1 or (n == 3 and k == 2)):
            hits.append((at, SNARE, 96 if n != 3 or k == 1 else 80, unit / 2))
        if level == 3 and n >= 4 and k == n // 2 - 1:
            hits.append((at + unit / 2, KICK, 90, unit / 4))
        per_beat = {1: 1, 2: 2, 3: 4}[level]
        if unit > 1.0 and level > 1:
            per_beat = 3  # compound beats: hats on each eighth
        for j in range(per_beat):
            hat = at + j * unit / per_beat
            if hat - bar.start < stop - 1e-9:
                hits.append((hat, CLOSED_HAT, 78 if j == 0 else 58, unit / per_beat / 2))
    return hits


def _fill(start: float, length: float, unit: float) -> list[tuple[float, int, int, float]]:
    """Sixteenth-note fill: snare hits rising in velocity, then toms stepping down."""
    step = min(0.25, unit / 4)
    count = max(1, math.floor(length / step + 1e-9))
    hits = []
    for j in range(count):
        velocity = 70 + round(45 * j / max(count - 1, 1))
        key = SNARE if j < count // 2 else TOMS[min(len(TOMS) - 1, (j - count // 2) * len(TOMS) // max(
            count - count // 2, 1))]
        hits.append((start + j * step, key, velocity, step))
    return hits
