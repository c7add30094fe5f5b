"""Seamless loops by construction: pick bar lines, render the body between copies of itself, cut.

A looping track is an intro (0 or more whole bars from the start of the piece) followed by a body
(1 or more whole bars). Playing it, a game engine plays the intro once and then the body forever, so the
first frames of the body must already hold what the body's own end leaves sounding: note releases, echo,
reverb and plugin tails. We get that without knowing anything about the renderer: the piece is rebuilt as
intro + body + body + the start of another (+ more copies when the body is short), rendered once with its
tail, and the file keeps the intro and the second-to-last copy. Its start was rendered right after another
copy of itself, and its end runs on into the next copy, so nothing the renderer or the arranger does
differently at the very end of a piece (dropping drum hits after the last note, reassigning the last
voices) is kept. A renderer is causal, so the next copy is needed only as far as END_GUARD_SECONDS.
The one join that was never rendered, intro into the kept copy on the first pass, gets a 10 ms crossfade
from the intro's end into the frames that preceded the kept copy, so it is as smooth as every loop seam.

Frame arithmetic (the loop length is rounded exactly once):
    intro_frames = round(seconds(intro) * sample_rate)        -> LOOPSTART
    body_frames  = round(seconds(body) * sample_rate)         -> LOOPLENGTH
where seconds() integrates the tempo map over the bars, i.e. bars x beats per bar x 60 / qpm for a steady
tempo. Body copy k is placed exactly k x body_frames frames after the first one, so a renderer that puts a
note at round(start x rate) repeats it with a period of exactly body_frames.

A jingle (no loop) is the piece as written, rendered with its tail, cut where the tail falls quiet and
faded to digital silence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import ChiptuneError
from .midi import Control, Note, Piece, TempoChange, TimeSignature

RenderFn = Callable[[Piece, int], np.ndarray]
"""Renders a Piece to float32 stereo audio (frames, 2) at the given rate, tail included; deterministic.
The array is the caller's: a jingle is faded out in place rather than copied."""

SAMPLE_RATES = (32000, 44100, 48000)
"""The renderer's output rates: the S-DSP's own 32 kHz and the two rates every engine plays natively."""

SPLIT_PARTS = ("intro", "loop")
"""The clips a split export writes beside a looping track NAME: NAME_intro and NAME_loop."""

BAR_TOLERANCE_BEATS = 1 / 16
"""A last note ending at most this far (a 64th note) past a bar line still ends the piece at that line,
so a played-in note-off a few ticks late does not add an empty bar to the loop."""

ONSET_TOLERANCE_BEATS = 1e-6
"""Onsets this close before a bar line belong to the bar after it (float noise from tick conversion)."""

WARMUP_SECONDS = 8.0
"""The kept body is rendered after at least one copy of itself and at least this many seconds of them, so
tails up to this long (long echo feedback, reverb) are the body's own at the loop start."""

END_GUARD_SECONDS = 4.0
"""How far the last copy runs past the kept one: what renderers and the arranger do differently at the end
of a piece stays within its last bar or a fade of a second or two, and nothing later changes the kept copy.
For a long body this spares rendering most of a copy."""

CONTROL_DEFAULTS = {(0xE0,): bytes([0xE0, 0x00, 0x40]), (0xD0,): bytes([0xD0, 0]),
                    (0xB0, 1): bytes([0xB0, 1, 0]), (0xB0, 11): bytes([0xB0, 11, 127]),
                    **{(0xB0, cc): bytes([0xB0, cc, 0]) for cc in range(64, 70)}}
"""What a controller is before anything sets it, for those with a standard rest value (pitch bend centred,
no pressure, no modulation, full expression, pedals up): a body copy restores it when the body changes it
and the intro never set it."""

JOIN_FADE_SECONDS = 0.01
"""The intro's last 10 ms crossfade into the audio that precedes the kept body, so the first pass from the
intro into the body is as continuous as every later pass from the body's end into its start."""

MAX_MUSIC_SECONDS = 1200.0
"""The longest stretch of music rendered (20 minutes, about 150 MB of audio at 32 kHz): a MIDI file that
runs longer is almost always a stray event far past the music, and would take minutes and gigabytes."""
JINGLE_FADE_SECONDS = 0.05
JINGLE_SILENCE_DB = -60.0
"""A jingle ends where its tail stays this far below the track's peak, then fades to zero."""
TAIL_SCAN_FRAMES = 1 << 15
"""Frames read at a time when searching a jingle's tail backwards for where it falls quiet."""


class RequestError(ChiptuneError):
    """A render request that does not fit its piece; `key` is the track setting it comes from (`bars`,
    `intro_bars`, `midi`, `sample_rate`), for a build to report it on that manifest key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class TrackAudio:
    """Rendered audio of one track and where its loop is.

    `audio` is float32 (frames, 2). For a looping track the file is intro + one body:
    `loop_start` = intro frames, `loop_length` = body frames, and loop_start + loop_length == frames.
    Both are None for a jingle. `qpm` is the tempo where the body starts (the opening tempo for a jingle),
    `bars` the body's bars (all bars for a jingle), `intro_bars` the intro's bars.
    """

    audio: np.ndarray
    sample_rate: int
    loop_start: int | None
    loop_length: int | None
    qpm: float
    bars: int
    intro_bars: int

    @property
    def frames(self) -> int:
        return int(self.audio.shape[0])

    @property
    def looping(self) -> bool:
        return self.loop_length is not None

    @property
    def loop_end(self) -> int | None:
        """First frame after the loop (exclusive end): loop_start + loop_length."""
        if self.loop_start is None or self.loop_length is None:
            return None
        return self.loop_start + self.loop_length


@dataclass(frozen=True)
class LoopPlan:
    """Where the intro and the body lie in the source piece, in beats, seconds and output frames.

    `copies` body copies are rendered, the last one only its first END_GUARD_SECONDS; the file keeps copy
    number `kept` (0-based), the second-to-last.
    """

    body_start_beat: float
    body_end_beat: float
    body_start_seconds: float
    body_end_seconds: float
    intro_frames: int
    body_frames: int
    copies: int
    intro_bars: int
    bars: int

    @property
    def kept(self) -> int:
        return self.copies - 2


# ------------------------------------------------------------------------------------------ bar lines


def bar_lines(piece: Piece, last_beat: float) -> list[float]:
    """Bar lines in quarter notes from beat 0 up to the first one at or after `last_beat`.

    Bars follow the time-signature map; a signature change in the middle of a bar starts a new bar there
    (the shortened bar ends at the change), as notation programs do when reading such files.
    """
    sigs = sorted(piece.time_signatures, key=lambda s: s.beat)
    if not sigs or sigs[0].beat > 0:
        sigs.insert(0, TimeSignature(0.0, 0.0, 4, 4))
    lines: list[float] = []
    for i, sig in enumerate(sigs):
        seg_end = sigs[i + 1].beat if i + 1 < len(sigs) else math.inf
        bar_len = sig.numerator * 4.0 / sig.denominator
        k = 0
        while True:
            line = sig.beat + k * bar_len
            if line >= seg_end - ONSET_TOLERANCE_BEATS:
                break
            lines.append(line)
            if line >= last_beat:
                return lines
            k += 1
    return lines


def piece_bar_lines(piece: Piece) -> list[float]:
    """Every bar line of the piece, the last one at or after its last note's end (within a 64th note)."""
    if not piece.notes:
        raise RequestError("midi", "the piece has no notes")
    end_beat = float(piece.seconds_to_beats(piece.end_time))
    lines = bar_lines(piece, end_beat - BAR_TOLERANCE_BEATS)
    if len(lines) < 2:
        # A piece shorter than the tolerance still has one bar.
        lines = bar_lines(piece, lines[-1] + ONSET_TOLERANCE_BEATS)
    return lines


def beats_to_seconds_span(piece: Piece, first: float, last: float) -> float:
    """Seconds from beat `first` to beat `last`, summed segment by segment over the tempo map."""
    tempos = sorted(piece.tempos, key=lambda t: t.beat)
    total = 0.0
    for i, t in enumerate(tempos):
        seg_lo = 0.0 if i == 0 else t.beat
        seg_hi = tempos[i + 1].beat if i + 1 < len(tempos) else math.inf
        lo, hi = max(first, seg_lo), min(last, seg_hi)
        if hi > lo:
            total += (hi - lo) * 60.0 / t.qpm
    return total


def _tempo_at(piece: Piece, beat: float) -> float:
    current = piece.tempos[0].qpm
    for t in sorted(piece.tempos, key=lambda t: t.beat):
        if t.beat <= beat + ONSET_TOLERANCE_BEATS:
            current = t.qpm
    return current


def _signature_at(piece: Piece, beat: float) -> TimeSignature:
    current = TimeSignature(0.0, 0.0, 4, 4)
    for s in sorted(piece.time_signatures, key=lambda s: s.beat):
        if s.beat <= beat + ONSET_TOLERANCE_BEATS:
            current = s
    return current


# ------------------------------------------------------------------------------------------- planning


def check_sample_rate(sample_rate: int) -> None:
    if sample_rate not in SAMPLE_RATES:
        supported = ", ".join(str(r) for r in SAMPLE_RATES)
        raise RequestError("sample_rate", f"unsupported sample rate {sample_rate} Hz (use one of {supported})")


def _bars(n: int) -> str:
    return f"{n} bar" if n == 1 else f"{n} bars"


def _whole_bars(value: float | int, what: str, key: str) -> int:
    """Bar counts must be whole: a fractional intro would end off a bar line."""
    if isinstance(value, bool) or not float(value).is_integer():
        raise RequestError(key, f"{what} of {value!r} bars does not end on a bar line (give whole bars)")
    return int(value)


def plan_loop(piece: Piece, sample_rate: int, intro_bars: int = 0, bars: int | None = None) -> LoopPlan:
    """Check a loop request against the piece and place its bar lines; raises before any rendering.

    Without `bars` the body runs from the intro's end to the piece's last bar line.
    """
    check_sample_rate(sample_rate)
    intro = _whole_bars(intro_bars, "intro", "intro_bars")
    if intro < 0:
        raise RequestError("intro_bars", f"intro of {intro} bars: the intro cannot be negative")
    lines = piece_bar_lines(piece)
    total = len(lines) - 1
    if bars is None:
        body = total - intro
        if body < 1:
            raise RequestError("intro_bars", f"an intro of {_bars(intro)} leaves no body: the piece has {_bars(total)}")
    else:
        body = _whole_bars(bars, "body", "bars")
        if body < 1:
            raise RequestError("bars", f"body of {body} bars: a loop needs at least 1 bar")
        if intro + body > total:
            raise RequestError("bars", f"loop of {intro} intro + {body} body bars is longer than the piece "
                                f"({_bars(total)})")
    b0, b1 = lines[intro], lines[intro + body]
    t0 = float(piece.beats_to_seconds(b0))
    body_seconds = beats_to_seconds_span(piece, b0, b1)
    body_frames = round(body_seconds * sample_rate)
    if body_frames < 1:
        raise RequestError("bars", f"body of {_bars(body)} is shorter than one sample at {sample_rate} Hz")
    copies = 2 + max(1, math.ceil(WARMUP_SECONDS / body_seconds))
    return LoopPlan(b0, b1, t0, float(piece.beats_to_seconds(b1)), round(t0 * sample_rate), body_frames,
                    copies, intro, body)


def loop_piece(piece: Piece, plan: LoopPlan, sample_rate: int) -> Piece:
    """The piece to render: the intro, then `plan.copies` copies of the body, copy k shifted by exactly
    k x body_frames frames, with the tempo and time-signature maps repeated alongside. The last copy keeps
    only the notes that carry the music END_GUARD_SECONDS past its start.

    Each section's notes stop at its closing bar line (a note tied over it would otherwise overlap the
    next copy); their releases still ring into what follows, which is the point.
    """
    onsets = piece.seconds_to_beats(np.array([n.start for n in piece.notes]))
    t_intro, t_end = plan.body_start_seconds, plan.body_end_seconds
    intro_notes: list[Note] = []
    body_notes: list[Note] = []
    for note, onset in zip(piece.notes, onsets, strict=True):
        if onset < plan.body_start_beat - ONSET_TOLERANCE_BEATS:
            intro_notes.append(_cut(note, t_intro))
        elif onset < plan.body_end_beat - ONSET_TOLERANCE_BEATS:
            body_notes.append(_cut(note, t_end))
    shift = plan.body_frames / sample_rate
    span = plan.body_end_beat - plan.body_start_beat
    notes = list(intro_notes)
    lo, hi = plan.body_start_beat + ONSET_TOLERANCE_BEATS, plan.body_end_beat - ONSET_TOLERANCE_BEATS
    tempos = [t for t in piece.tempos if t.beat < hi]
    sigs = [s for s in piece.time_signatures if s.beat < hi]
    inner_tempos = [t for t in tempos if t.beat > lo]
    inner_sigs = [s for s in sigs if s.beat > lo]
    first_sig = _signature_at(piece, plan.body_start_beat)
    guard = _leading(body_notes, t_intro + END_GUARD_SECONDS)
    intro_controls, body_controls, restore = _split_controls(piece, plan, t_intro)
    guard_end = max((n.end for n in guard), default=t_intro)
    controls = list(intro_controls)
    for k in range(plan.copies):
        dt, db = k * shift, k * span
        notes.extend(_moved(n, dt) for n in (guard if k == plan.copies - 1 else body_notes))
        if k > 0:
            controls.extend(c.moved(dt) for c in restore)
        controls.extend(c.moved(dt) for c in body_controls if k < plan.copies - 1 or c.time <= guard_end)
        if k == 0:
            continue
        tempos.append(TempoChange(t_intro + dt, plan.body_start_beat + db, _tempo_at(piece, plan.body_start_beat)))
        tempos.extend(TempoChange(t.time + dt, t.beat + db, t.qpm) for t in inner_tempos)
        sigs.append(TimeSignature(t_intro + dt, plan.body_start_beat + db, first_sig.numerator,
                                  first_sig.denominator))
        sigs.extend(TimeSignature(s.time + dt, s.beat + db, s.numerator, s.denominator) for s in inner_sigs)
    notes.sort(key=lambda n: (n.start, n.pitch, n.track))
    controls.sort(key=lambda c: c.time)  # stable: what is restored at a copy's start precedes its own
    return Piece(notes, tempos, sigs, list(piece.track_names), controls)


def _control_key(c: Control) -> tuple[int, tuple[int, ...]]:
    """Which controller a message sets: its channel and status (plus the CC number)."""
    kind = (c.data[0], c.data[1]) if c.data[0] == 0xB0 else (c.data[0],)
    return c.channel, kind


def _split_controls(piece: Piece, plan: LoopPlan, t_intro: float
                    ) -> tuple[list[Control], list[Control], list[Control]]:
    """The intro's controls, the body's, and what restores the controllers' state at the body's start
    (the intro's last value of each controller the body changes, else its rest value) at the start of
    every later copy: a bend or pedal left at the body's end must not carry into the next pass."""
    beats = piece.seconds_to_beats(np.array([c.time for c in piece.controls]))
    intro: list[Control] = []
    body: list[Control] = []
    state: dict[tuple, Control] = {}
    for c, beat in zip(piece.controls, beats, strict=True):
        if beat < plan.body_start_beat - ONSET_TOLERANCE_BEATS:
            intro.append(c)
            state[_control_key(c)] = c
        elif beat < plan.body_end_beat - ONSET_TOLERANCE_BEATS:
            body.append(c)
    restore: list[Control] = []
    for key in dict.fromkeys(_control_key(c) for c in body):
        channel, kind = key
        data = state[key].data if key in state else CONTROL_DEFAULTS.get(kind)
        if data is not None:
            restore.append(Control(t_intro, data, channel))
    return intro, body, restore


def _leading(notes: list[Note], until: float) -> list[Note]:
    """The notes, in start order, that take the music to `until`: all that start before it, and later ones
    while none of those sounds that long (a body that opens with a rest)."""
    out: list[Note] = []
    reach = -math.inf
    for note in sorted(notes, key=lambda n: n.start):
        if note.start >= until and reach >= until:
            break
        out.append(note)
        reach = max(reach, note.end)
    return out


def _cut(note: Note, end: float) -> Note:
    if note.end <= end:
        return note
    return replace(note, end=end)


def _moved(note: Note, dt: float) -> Note:
    if dt == 0:
        return note
    return replace(note, start=note.start + dt, end=note.end + dt)


# ------------------------------------------------------------------------------------------ rendering


def _stereo(audio: np.ndarray, min_frames: int) -> np.ndarray:
    """The renderer's output as float32 (frames, 2), zero-padded to `min_frames` if it stopped early."""
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[1] not in (1, 2):
        raise ValueError(f"the renderer returned audio of shape {a.shape}, expected (frames, 2)")
    if a.shape[1] == 1:
        a = np.repeat(a, 2, axis=1)
    if a.shape[0] < min_frames:
        a = np.concatenate([a, np.zeros((min_frames - a.shape[0], 2), np.float32)])
    return a


def render_track(piece: Piece, render: RenderFn, sample_rate: int, loop: bool = True, intro_bars: int = 0,
                 bars: int | None = None) -> TrackAudio:
    """Render a piece as a seamless loop (intro + one body, loop at the intro's end) or as a jingle.

    For a jingle `intro_bars` must be 0 and `bars`, if given, keeps only the first `bars` bars.
    Every request is checked before `render` is called, so a bad one costs nothing.
    """
    if loop:
        return _render_loop(piece, render, sample_rate, _checked_loop(piece, sample_rate, intro_bars, bars))
    return _render_jingle(*jingle_piece(piece, sample_rate, intro_bars, bars), render, sample_rate)


def check_request(piece: Piece, sample_rate: int, loop: bool = True, intro_bars: int = 0,
                  bars: int | None = None) -> None:
    """Raise what render_track would for this request, without rendering (a build checks a given MIDI
    file's bars this way, where the problem can still be put on its manifest key)."""
    if loop:
        _checked_loop(piece, sample_rate, intro_bars, bars)
    else:
        jingle_piece(piece, sample_rate, intro_bars, bars)


def _checked_loop(piece: Piece, sample_rate: int, intro_bars: int, bars: int | None) -> LoopPlan:
    plan = plan_loop(piece, sample_rate, intro_bars, bars)
    _check_length(piece, (plan.intro_frames + plan.body_frames) / sample_rate, bars)
    return plan


def jingle_piece(piece: Piece, sample_rate: int, intro_bars: int = 0, bars: int | None = None) -> tuple[Piece, int]:
    """The part of the piece a jingle plays (its first `bars` bars, or all of it) and its bar count;
    RequestError if the request cannot be rendered."""
    check_sample_rate(sample_rate)
    if _whole_bars(intro_bars, "intro", "intro_bars") != 0:
        raise RequestError("intro_bars",
                           f"an intro of {_bars(int(intro_bars))} needs a looping track (a jingle has none)")
    lines = piece_bar_lines(piece)
    total = len(lines) - 1
    if bars is not None:
        count = _whole_bars(bars, "jingle", "bars")
        if not 1 <= count <= total:
            raise RequestError("bars", f"jingle of {_bars(count)}: the piece has {_bars(total)}")
        end_seconds = float(piece.beats_to_seconds(lines[count]))
        onsets = piece.seconds_to_beats(np.array([n.start for n in piece.notes]))
        notes = [_cut(n, end_seconds) for n, onset in zip(piece.notes, onsets, strict=True)
                 if onset < lines[count] - ONSET_TOLERANCE_BEATS]
        controls = [c for c in piece.controls if c.time < end_seconds]
        piece = Piece(notes, piece.tempos, piece.time_signatures, piece.track_names, controls)
        total = count
    _check_length(piece, piece.end_time, bars)
    return piece, total


def _render_loop(piece: Piece, render: RenderFn, sample_rate: int, plan: LoopPlan) -> TrackAudio:
    s, n = plan.intro_frames, plan.body_frames
    kept = s + plan.kept * n
    audio = _stereo(render(loop_piece(piece, plan, sample_rate), sample_rate), kept + n)
    out = np.empty((s + n, 2), np.float32)
    out[s:] = audio[kept:kept + n]
    if s:
        out[:s] = audio[:s]
        fade = min(s, round(JOIN_FADE_SECONDS * sample_rate))
        if fade:
            phase = (np.arange(fade, dtype=np.float64) + 0.5) / fade * (np.pi / 2)
            out[s - fade:s] = (audio[s - fade:s] * np.cos(phase)[:, None]
                               + audio[kept - fade:kept] * np.sin(phase)[:, None])
    return TrackAudio(out, sample_rate, s, n, _tempo_at(piece, plan.body_start_beat), plan.bars,
                      plan.intro_bars)


def _render_jingle(piece: Piece, total: int, render: RenderFn, sample_rate: int) -> TrackAudio:
    """Render a checked jingle: `piece` is already cut to its `total` bars."""
    music_end = round(piece.end_time * sample_rate)
    audio = _stereo(render(piece, sample_rate), music_end + jingle_fade(sample_rate))
    music = audio[:music_end]
    peak = max(float(music.max(initial=0.0)), -float(music.min(initial=0.0)))
    ending = jingle_ending(audio[music_end:], peak, sample_rate)  # faded in place: long enough to need no pad
    return TrackAudio(audio[:music_end + len(ending)], sample_rate, None, None, piece.qpm, total, 0)


def jingle_fade(sample_rate: int) -> int:
    """Frames of a jingle's closing fade-out."""
    return max(1, round(JINGLE_FADE_SECONDS * sample_rate))


def jingle_ending(ringing: np.ndarray, music_peak: float, sample_rate: int) -> np.ndarray:
    """How a jingle ends: what rings on after its music (float32 (frames, 2), faded in place when long
    enough) is cut once it stays JINGLE_SILENCE_DB below the whole jingle's peak (`music_peak` is the
    music's) and faded out over JINGLE_FADE_SECONDS; it is padded with silence to at least the fade."""
    fade = jingle_fade(sample_rate)
    if len(ringing) < fade:
        ringing = np.concatenate((ringing, np.zeros((fade - len(ringing), 2), np.float32)))
    peak = max(music_peak, float(ringing.max(initial=0.0)), -float(ringing.min(initial=0.0)))
    end = min(len(ringing), _sounding_until(ringing, 0, peak * 10 ** (JINGLE_SILENCE_DB / 20)) + fade)
    out = ringing[:end]
    ramp = 0.5 * (1 + np.cos(np.linspace(0.0, np.pi, fade)))
    out[end - fade:] *= ramp[:, None].astype(np.float32)
    return out


def _check_length(piece: Piece, seconds: float, bars: int | None) -> None:
    """Too long is the `bars` key's doing when it was given, else the MIDI's."""
    if seconds > MAX_MUSIC_SECONDS:
        last = max(piece.notes, key=lambda n: n.end)
        raise RequestError("midi" if bars is None else "bars",
                           f"{seconds:.0f} s of music to render (the last note, pitch {last.pitch}, ends at "
                           f"{last.end:.0f} s); at most {MAX_MUSIC_SECONDS / 60:.0f} minutes are rendered")


def _sounding_until(audio: np.ndarray, start: int, threshold: float) -> int:
    """One past the last frame from `start` on where a channel's magnitude exceeds `threshold`, at least
    `start`. The tail is searched backwards a block at a time: it is short, and the music before it never
    needs reading."""
    for hi in range(audio.shape[0], start, -TAIL_SCAN_FRAMES):
        lo = max(start, hi - TAIL_SCAN_FRAMES)
        block = audio[lo:hi]
        loud = np.flatnonzero(((block > threshold) | (block < -threshold)).any(axis=1))
        if loud.size:
            return lo + int(loud[-1]) + 1
    return start


def split_clip(name: str, part: str) -> str:
    """The file stem of a split export's clip (`part` is one of SPLIT_PARTS)."""
    return f"{name}_{part}"


def godot_import_file(asset: Path) -> Path:
    """Where Godot keeps an asset's import settings (export writes them with godot_import)."""
    return asset.with_name(asset.name + ".import")
