"""MIDI files in and out (through mido), the Note/Piece types, and quantization to the step grid.

Times are kept in seconds and in quarter notes (beats): seconds are what audio rendering needs, beats are
what quantization needs, and the tempo map converts between them.
"""

from __future__ import annotations

import bisect
import io
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mido
import numpy as np

from .errors import MidiError

STEPS_PER_QUARTER = 4
DEFAULT_QPM = 120.0
MIN_QPM = 1.0
MAX_QPM = 2000.0
DRUM_CHANNEL = 9
SUSTAIN_CC = 64


@dataclass(frozen=True, slots=True)
class Note:
    """One sounding note; `track` is the index of the source track (or of the part it belongs to), and
    `channel` its MIDI channel in the source file (0-15), which the file's controls refer to."""

    pitch: int
    velocity: int
    start: float
    end: float
    program: int = 0
    is_drum: bool = False
    track: int = 0
    channel: int = 0


@dataclass(frozen=True, slots=True)
class TempoChange:
    time: float  # seconds
    beat: float  # quarter notes from the start
    qpm: float


@dataclass(frozen=True, slots=True)
class TimeSignature:
    time: float
    beat: float
    numerator: int
    denominator: int


@dataclass(frozen=True, slots=True)
class Control:
    """A channel message that is not a note or a program change: a control change (the sustain pedal
    included), pitch bend or channel pressure. Instruments that play MIDI (VST3 plugins) receive these;
    the note model and the built-in sampler use notes only (the pedal is already in the note lengths).

    `data` is the raw message with the channel nibble cleared: whoever sends it picks the channel. As in
    MIDI, a control applies to the notes of its `channel`, whatever track either is in.
    """

    time: float  # seconds
    data: bytes
    channel: int = 0

    def moved(self, dt: float) -> Control:
        return self if dt == 0 else Control(self.time + dt, self.data, self.channel)


CONTROL_STATUSES = (0xB0, 0xD0, 0xE0)
"""Control change, channel pressure, pitch bend: the channel messages kept as Controls."""


@dataclass
class Piece:
    """A whole piece: its notes and controls plus the tempo and time-signature maps, all on one timeline."""

    notes: list[Note]
    tempos: list[TempoChange] = field(default_factory=lambda: [TempoChange(0.0, 0.0, DEFAULT_QPM)])
    time_signatures: list[TimeSignature] = field(default_factory=lambda: [TimeSignature(0.0, 0.0, 4, 4)])
    track_names: list[str] = field(default_factory=list)
    controls: list[Control] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What was wrong in the file it was read from but could be read anyway (for the caller to report)."""

    @property
    def end_time(self) -> float:
        return max((n.end for n in self.notes), default=0.0)

    @property
    def qpm(self) -> float:
        """The opening tempo (what a single-tempo consumer should use)."""
        return self.tempos[0].qpm

    def seconds_to_beats(self, seconds: np.ndarray | float) -> np.ndarray:
        """Convert seconds to quarter notes through the tempo map (piecewise linear)."""
        times = np.array([t.time for t in self.tempos])
        beats = np.array([t.beat for t in self.tempos])
        rates = np.array([t.qpm / 60.0 for t in self.tempos])
        s = np.asarray(seconds, dtype=np.float64)
        idx = np.clip(np.searchsorted(times, s, side="right") - 1, 0, len(times) - 1)
        return beats[idx] + (s - times[idx]) * rates[idx]

    def beats_to_seconds(self, beats_in: np.ndarray | float) -> np.ndarray:
        times = np.array([t.time for t in self.tempos])
        beats = np.array([t.beat for t in self.tempos])
        rates = np.array([t.qpm / 60.0 for t in self.tempos])
        b = np.asarray(beats_in, dtype=np.float64)
        idx = np.clip(np.searchsorted(beats, b, side="right") - 1, 0, len(beats) - 1)
        return times[idx] + (b - beats[idx]) / rates[idx]


@dataclass
class QuantizedPiece:
    """Notes on the step grid (steps_per_quarter = 4) with one tempo and one time signature.

    Arrays are parallel and sorted by (start, pitch); `end` is exclusive.
    """

    pitch: np.ndarray
    start: np.ndarray
    end: np.ndarray
    velocity: np.ndarray
    num_steps: int
    qpm: float = DEFAULT_QPM
    numerator: int = 4
    denominator: int = 4

    @property
    def steps_per_bar(self) -> int:
        return max(1, round(STEPS_PER_QUARTER * 4 * self.numerator / self.denominator))

    @property
    def note_steps(self) -> int:
        return int(np.sum(self.end - self.start))

    def __len__(self) -> int:
        return len(self.pitch)

    @classmethod
    def from_notes(
        cls,
        notes: Iterable[tuple[int, int, int, int]],
        num_steps: int | None = None,
        qpm: float = DEFAULT_QPM,
        numerator: int = 4,
        denominator: int = 4,
    ) -> QuantizedPiece:
        """Build from (pitch, start, end, velocity) tuples, cleaning overlaps of one pitch."""
        arr = np.array(list(notes), dtype=np.int64).reshape(-1, 4)
        pitch, start, end, vel = _clean_overlaps(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])
        total = int(end.max()) if len(end) else 0
        return cls(pitch, start, end, vel, max(total, num_steps or 0), qpm, numerator, denominator)

    def transposed(self, semitones: int) -> QuantizedPiece | None:
        """The same notes moved by `semitones`, or None if any note would leave 0..127."""
        p = self.pitch + semitones
        if len(p) and (p.min() < 0 or p.max() > 127):
            return None
        return QuantizedPiece(p, self.start, self.end, self.velocity, self.num_steps, self.qpm,
                              self.numerator, self.denominator)

    def window(self, first: int, last: int) -> QuantizedPiece:
        """Steps [first, last) as a piece of its own; notes crossing the edges are cut, not dropped."""
        keep = (self.start < last) & (self.end > first)
        start = np.maximum(self.start[keep], first) - first
        end = np.minimum(self.end[keep], last) - first
        return QuantizedPiece(self.pitch[keep], start, end, self.velocity[keep], last - first, self.qpm,
                              self.numerator, self.denominator)


def _clean_overlaps(
    pitch: np.ndarray, start: np.ndarray, end: np.ndarray, vel: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Make notes of one pitch disjoint: a re-strike ends the earlier note; same-step duplicates merge.

    The polyphony encoding has one on/off state per pitch, so two notes of one pitch can never overlap.
    """
    if len(pitch) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    end = np.maximum(end, start + 1)
    order = np.lexsort((-end, start, pitch))
    pitch, start, end, vel = pitch[order], start[order], end[order], vel[order]
    same_pitch_next = np.zeros(len(pitch), dtype=bool)
    same_pitch_next[:-1] = pitch[1:] == pitch[:-1]
    dup = np.zeros(len(pitch), dtype=bool)
    dup[1:] = same_pitch_next[:-1] & (start[1:] == start[:-1])
    pitch, start, end, vel = pitch[~dup], start[~dup], end[~dup], vel[~dup]
    nxt = np.full(len(pitch), np.iinfo(np.int64).max)
    same = pitch[1:] == pitch[:-1]
    nxt[:-1] = np.where(same, start[1:], nxt[:-1])
    end = np.minimum(end, nxt)
    order = np.lexsort((pitch, start))
    return pitch[order], start[order], end[order], vel[order]


# ----------------------------------------------------------------------------------------------- reading


def read_midi(path: str | Path) -> Piece:
    """Read a standard MIDI file (format 0 or 1) into a Piece.

    Tempo events from every track form one global tempo map (format 1 files often put them in several
    tracks); note-on with velocity 0 is a note-off; CC64 holds notes until the pedal lifts; a re-struck
    pitch ends the earlier note of that pitch and channel; a note that ends where it starts lasts one tick.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MidiError(path, f"cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise MidiError(path, "file is empty (0 bytes)")
    if not data.startswith(b"MThd"):
        raise MidiError(path, "not a MIDI file (no MThd header)")
    warnings: list[str] = []
    try:
        try:
            mid = mido.MidiFile(file=io.BytesIO(data))
        except (OSError, ValueError) as exc:  # mido raises either, depending on the message kind
            if "data byte" not in str(exc):
                raise
            # Some writers put values above 127 in data bytes (a velocity of 200, say); they are read as 127,
            # as most players do, and the caller is told.
            mid = mido.MidiFile(file=io.BytesIO(data), clip=True)
            warnings.append("data bytes above 127 (not valid MIDI) were read as 127")
    except (EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise MidiError(path, f"broken MIDI data ({type(exc).__name__}: {str(exc) or 'truncated'})") from None
    if mid.type == 2:
        raise MidiError(path, "MIDI format 2 (independent sequences) is not supported")
    piece = _piece_from_midifile(mid, path)
    piece.warnings = warnings
    return piece


def _piece_from_midifile(mid: mido.MidiFile, path: Path) -> Piece:
    tpb = mid.ticks_per_beat
    if tpb <= 0:
        raise MidiError(path, f"invalid ticks per beat {tpb}")
    tempo_ticks: dict[int, int] = {}
    ts_ticks: dict[int, tuple[int, int]] = {}
    tracks_abs: list[list[tuple[int, mido.Message]]] = []
    names: list[str] = []
    for track in mid.tracks:
        tick = 0
        events: list[tuple[int, mido.Message]] = []
        name = ""
        for msg in track:
            tick += msg.time
            if msg.is_meta:
                if msg.type == "set_tempo":
                    qpm = mido.tempo2bpm(msg.tempo) if msg.tempo > 0 else float("inf")
                    if not MIN_QPM <= qpm <= MAX_QPM:
                        raise MidiError(path, f"absurd tempo {qpm:.6g} qpm at tick {tick}")
                    tempo_ticks[tick] = msg.tempo
                elif msg.type == "time_signature":
                    ts_ticks[tick] = (msg.numerator, msg.denominator)
                elif msg.type == "track_name" and not name:
                    name = msg.name
            else:
                events.append((tick, msg))
        tracks_abs.append(events)
        names.append(name)

    # Tempo map in ticks -> seconds.
    tempo_points = sorted(tempo_ticks.items())
    if not tempo_points or tempo_points[0][0] != 0:
        tempo_points.insert(0, (0, mido.bpm2tempo(DEFAULT_QPM)))
    tick_marks = [t for t, _ in tempo_points]
    sec_marks = [0.0]
    for (t0, us0), (t1, _) in itertools.pairwise(tempo_points):
        sec_marks.append(sec_marks[-1] + (t1 - t0) * us0 / 1e6 / tpb)

    def tick_to_sec(tick: int) -> float:
        i = bisect.bisect_right(tick_marks, tick) - 1
        return sec_marks[i] + (tick - tick_marks[i]) * tempo_points[i][1] / 1e6 / tpb

    tempos = []
    for (t, us), s in zip(tempo_points, sec_marks, strict=True):
        qpm = mido.tempo2bpm(us)
        if tempos and abs(tempos[-1].qpm - qpm) < 1e-9:
            continue
        tempos.append(TempoChange(s, t / tpb, qpm))
    sigs = []
    for t, (num, den) in sorted(ts_ticks.items()):
        if num <= 0 or den <= 0:
            raise MidiError(path, f"invalid time signature {num}/{den} at tick {t}")
        if sigs and (sigs[-1].numerator, sigs[-1].denominator) == (num, den):
            continue
        sigs.append(TimeSignature(tick_to_sec(t), t / tpb, num, den))
    if not sigs or sigs[0].beat > 0:
        sigs.insert(0, TimeSignature(0.0, 0.0, 4, 4))

    notes: list[Note] = []
    controls: list[Control] = []
    for index, events in enumerate(tracks_abs):
        notes.extend(_track_notes(events, index, tick_to_sec))
        controls.extend(_track_controls(events, tick_to_sec))
    notes.sort(key=lambda n: (n.start, n.pitch, n.track))
    controls.sort(key=lambda c: c.time)  # stable: one track's messages keep their order
    return Piece(notes, tempos, sigs, names, controls)


def _track_controls(events: list[tuple[int, mido.Message]], tick_to_sec) -> list[Control]:
    controls = []
    for tick, msg in events:
        raw = msg.bytes()
        if raw[0] & 0xF0 in CONTROL_STATUSES:
            controls.append(Control(tick_to_sec(tick), bytes([raw[0] & 0xF0, *raw[1:]]), raw[0] & 0x0F))
    return controls


def _track_notes(events: list[tuple[int, mido.Message]], track: int, tick_to_sec) -> list[Note]:
    """Pair note-ons with note-offs per (channel, pitch), applying the sustain pedal."""
    program = [0] * 16
    pedal = [False] * 16
    open_notes: dict[tuple[int, int], tuple[int, int, int]] = {}  # (ch, pitch) -> (start tick, vel, prog)
    held: dict[tuple[int, int], int] = {}  # released under the pedal: (ch, pitch) -> release tick
    spans: list[tuple[int, int, int, int, int, int]] = []  # ch, pitch, vel, prog, start, end

    def close(key: tuple[int, int], tick: int) -> None:
        start, vel, prog = open_notes.pop(key)
        held.pop(key, None)
        spans.append((key[0], key[1], vel, prog, start, tick))

    for tick, msg in events:
        kind = msg.type
        if kind == "program_change":
            program[msg.channel] = msg.program
        elif kind == "control_change" and msg.control == SUSTAIN_CC:
            ch = msg.channel
            down = msg.value >= 64
            if pedal[ch] and not down:
                for key in [k for k in held if k[0] == ch]:
                    close(key, tick)
            pedal[ch] = down
        elif kind == "note_on" and msg.velocity > 0:
            key = (msg.channel, msg.note)
            if key in open_notes:
                if open_notes[key][0] == tick:  # the same pitch struck twice at once (doubled parts): one note
                    open_notes.pop(key)
                    held.pop(key, None)
                else:
                    close(key, tick)
            open_notes[key] = (tick, msg.velocity, program[msg.channel])
        elif kind in ("note_off", "note_on"):
            key = (msg.channel, msg.note)
            if key not in open_notes:
                continue
            if pedal[msg.channel]:
                held[key] = tick
            else:
                close(key, tick)
    last_tick = events[-1][0] if events else 0
    for key in list(open_notes):
        close(key, max(last_tick, open_notes[key][0]))
    notes = []
    for ch, pitch, vel, prog, start, end in spans:
        # A note switched off at the tick it starts (common for drum hits) lasts one tick, as it would
        # sound on a synthesizer, rather than vanishing; quantizing stretches it to a step.
        s, e = tick_to_sec(start), tick_to_sec(max(end, start + 1))
        notes.append(Note(pitch, vel, s, e, prog, ch == DRUM_CHANNEL, track, ch))
    return notes


# ----------------------------------------------------------------------------------------------- writing


def write_midi(piece: Piece, path: str | Path, ticks_per_beat: int = 480) -> None:
    """Write a Piece as a format-1 MIDI file: a conductor track, then one track per source track/program.

    Drum notes go to channel 10; pitched groups take the other channels in order. A control goes to every
    group holding notes of its source channel, on that group's channel, as it applied to all those notes.
    """
    mid = build_midifile(piece, ticks_per_beat)
    mid.save(str(path))


def build_midifile(piece: Piece, ticks_per_beat: int = 480) -> mido.MidiFile:
    mid = mido.MidiFile(type=1, ticks_per_beat=ticks_per_beat)
    meta: list[tuple[int, int, str, dict]] = []
    for t in piece.tempos:
        meta.append((round(t.beat * ticks_per_beat), 0, "set_tempo", {"tempo": mido.bpm2tempo(t.qpm)}))
    for s in piece.time_signatures:
        meta.append((round(s.beat * ticks_per_beat), 1, "time_signature",
                     {"numerator": s.numerator, "denominator": s.denominator}))
    mid.tracks.append(_track_from(sorted(meta, key=lambda x: (x[0], x[1])), mido.MetaMessage))

    groups: dict[tuple[int, int, bool], list[Note]] = {}
    for n in piece.notes:
        groups.setdefault((n.track, n.program, n.is_drum), []).append(n)
    free_channels = [c for c in range(16) if c != DRUM_CHANNEL]
    for i, ((track, prog, drum), notes) in enumerate(sorted(groups.items())):
        channel = DRUM_CHANNEL if drum else free_channels[i % len(free_channels)]
        events: list[tuple[int, int, str, dict]] = [(0, 0, "program_change", {"channel": channel, "program": prog})]
        starts = piece.seconds_to_beats(np.array([n.start for n in notes]))
        ends = piece.seconds_to_beats(np.array([n.end for n in notes]))
        bad = next((n for n in notes if not 0 <= n.pitch <= 127), None)
        if bad is not None:
            raise ValueError(f"note pitch {bad.pitch} is outside MIDI's 0..127")
        for n, b0, b1 in zip(notes, starts, ends, strict=True):
            t0 = round(float(b0) * ticks_per_beat)
            t1 = max(t0 + 1, round(float(b1) * ticks_per_beat))
            events.append((t0, 2, "note_on", {"channel": channel, "note": int(n.pitch),
                                               "velocity": max(1, min(127, int(n.velocity)))}))
            events.append((t1, 1, "note_off", {"channel": channel, "note": int(n.pitch), "velocity": 0}))
        sources = {n.channel for n in notes}
        for c in piece.controls:
            if c.channel in sources:
                msg = mido.Message.from_bytes([c.data[0] | channel, *c.data[1:]])
                fields = {k: v for k, v in msg.dict().items() if k not in ("type", "time")}
                events.append((round(float(piece.seconds_to_beats(c.time)) * ticks_per_beat), 1, msg.type, fields))
        events.sort(key=lambda e: (e[0], e[1]))
        tr = _track_from(events, mido.Message)
        if track < len(piece.track_names) and piece.track_names[track]:
            tr.insert(0, mido.MetaMessage("track_name", name=piece.track_names[track], time=0))
        mid.tracks.append(tr)
    return mid


_CHECKED_HERE = frozenset({"note_on", "note_off"})
"""Message types whose fields build_midifile has range-checked already: mido's own per-message validation
is most of the cost of writing a long generated piece, so it is skipped for them."""


def _track_from(events: Sequence[tuple[int, int, str, dict]], kind: type) -> mido.MidiTrack:
    """A track from (absolute tick, order, type, fields); each message is built once, with its delta time."""
    track = mido.MidiTrack()
    now = 0
    for tick, _, name, fields in events:
        if name in _CHECKED_HERE:
            track.append(kind(name, skip_checks=True, time=tick - now, **fields))
        else:
            track.append(kind(name, time=tick - now, **fields))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    return track


# ------------------------------------------------------------------------------------------ quantization


def quantize_beats(beats: np.ndarray) -> np.ndarray:
    """Round quarter-note positions to the nearest step (halves round up, as the reference does)."""
    return np.floor(np.asarray(beats) * STEPS_PER_QUARTER + 0.5).astype(np.int64)


def split_and_quantize(piece: Piece, include_drums: bool = False, tempo_tolerance: float = 0.0
                       ) -> list[QuantizedPiece]:
    """Split the piece where the time signature changes or the tempo changes, and quantize each part.

    A tempo change splits only when it moves more than `tempo_tolerance` (a fraction) away from the tempo
    the current part started with: with 0 (the reference's rule) every change splits; with 0.1 a gradual
    ritardando or accelerando inside a phrase stays one part, as it should, for the grid is in beats.
    Notes belong to the part they start in and are cut at its end. Parts are quantized in beats, so the
    grid follows the music whatever the tempo; each part carries its own qpm and time signature.
    """
    bounds: dict[float, None] = {0.0: None}
    part_qpm = piece.tempos[0].qpm
    signature_beats = sorted(s.beat for s in piece.time_signatures)
    changes = sorted([(t.beat, 1, t.qpm) for t in piece.tempos]
                     + [(b, 0, _at_beat(piece.tempos, b).qpm) for b in signature_beats])
    for beat, is_tempo, qpm in changes:  # a metre change starts a part, and its tempo is the new reference
        if not is_tempo or abs(qpm / part_qpm - 1.0) > tempo_tolerance:
            bounds[beat] = None
            part_qpm = qpm
    edges = sorted(bounds)
    notes = [n for n in piece.notes if include_drums or not n.is_drum]
    if not notes:
        return []
    start_b = quantize_beats(piece.seconds_to_beats(np.array([n.start for n in notes])))
    end_b = quantize_beats(piece.seconds_to_beats(np.array([n.end for n in notes])))
    pitch = np.array([n.pitch for n in notes], dtype=np.int64)
    vel = np.array([n.velocity for n in notes], dtype=np.int64)
    edge_steps = sorted({int(quantize_beats(np.array([b]))[0]) for b in edges})
    last_step = int(max(end_b.max(), start_b.max() + 1))
    edge_steps = [e for e in edge_steps if e < last_step] + [last_step]
    parts = []
    for lo, hi in itertools.pairwise(edge_steps):
        sel = (start_b >= lo) & (start_b < hi)
        if not sel.any():
            continue
        beat = lo / STEPS_PER_QUARTER
        tempo = _at_beat(piece.tempos, beat)
        sig = _at_beat(piece.time_signatures, beat)
        q = QuantizedPiece.from_notes(
            zip(pitch[sel], start_b[sel] - lo, np.minimum(end_b[sel], hi) - lo, vel[sel], strict=True),
            num_steps=hi - lo, qpm=tempo.qpm, numerator=sig.numerator, denominator=sig.denominator)
        parts.append(q)
    return parts


def _at_beat(items, beat: float):
    """The last map entry at or before `beat` (tempo or time-signature maps are sorted by beat)."""
    current = items[0]
    for item in items:
        if item.beat <= beat + 1e-9:
            current = item
        else:
            break
    return current


def piece_from_quantized(q: QuantizedPiece, program: int = 0) -> Piece:
    """Turn grid notes back into a timed Piece at the quantized piece's tempo."""
    sec_per_step = 60.0 / q.qpm / STEPS_PER_QUARTER
    notes = [Note(int(p), int(v), float(s) * sec_per_step, float(e) * sec_per_step, program)
             for p, s, e, v in zip(q.pitch, q.start, q.end, q.velocity, strict=True)]
    return Piece(notes, [TempoChange(0.0, 0.0, q.qpm)], [TimeSignature(0.0, 0.0, q.numerator, q.denominator)])
