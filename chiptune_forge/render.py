"""Roles + preset -> stereo audio: arrangement, the built-in S-DSP sampler, echo, pedalboard effects.

`render_piece` is a pure function of its inputs and time-exact: a note starting at t seconds is keyed on at
sample round(t * 32000) and sounds from 6 samples later (the chip's key-on delay), so a passage moved by
whole samples renders the same samples moved. The DSP runs at 32 kHz with 16-bit output; the result is
then resampled (soxr) to the requested rate.

Parts are rendered per role and mixed: each role's notes go through the sampler's 8 shared voices into the
mixer's main or echo bus (`Mixer.add`), where a stem rendered by other means can be scheduled the same way,
as one long signal from sample 0, with or without the echo send: a role whose preset names a VST3 plugin
is rendered that way, at 32 kHz in a separate process (`chiptune_forge.plugins`).
TensorFlow is never imported here; pedalboard and soxr only when a preset or rate needs them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from .arrange import Part, arrange
from .errors import ChiptuneError
from .loops import check_sample_rate
from .midi import DRUM_CHANNEL, Note, Piece
from .presets import EffectSpec, Preset, RoleSpec, make_effect
from .snes.dsp import (
    DSP_RATE,
    OUTPUT_DELAY,
    PITCH_MAX,
    PITCH_ONE,
    Envelope,
    EnvelopeCurves,
    noise_stream,
    pitch_value,
)
from .snes.echo import Mixer
from .snes.instruments import INSTRUMENTS, NOISE_CLOCK, drum_hit, sample_rate_of, sample_source
from .snes.voices import Assignment, VoiceRequest, allocate_voices

ROLE_PRIORITY = {"lead": 4, "bass": 3, "drums": 2, "harmony": 1}
MIN_HOLD = 32  # samples a key stays down at least (a key-off during the key-on delay would silence the note)
SILENCE_LSB = 2  # |sample| at or below this many LSBs ends the tail (the echo can idle in a tiny limit cycle)
EFFECT_SILENCE = 1e-4  # -80 dBFS: where an effect's tail is cut
REVERB_TAIL_SECONDS = (1.0, 6.0)  # a Reverb's tail: 1 s plus 6 s x room_size
MAX_EFFECT_TAIL_SECONDS = 10.0
STEM_LIMIT = 4.0  # a plugin stem beyond +-4 (12 dB over full scale) is clipped before it is mixed


@dataclass(frozen=True, slots=True)
class VoiceNote:
    """One note, ready for the sampler: where it keys on and off, what it plays and how loud."""

    kon: int
    koff: int
    end: int  # where it falls silent by itself
    source: str  # instrument name, or "noise"
    pitch: int
    envelope: Envelope
    left: int
    right: int
    echo: bool
    priority: int

    @property
    def start(self) -> int:
        return self.kon + OUTPUT_DELAY

    @property
    def hold(self) -> int:
        """Audible samples before the key-off's release run."""
        return self.koff - self.start + 1


@dataclass
class RenderStats:
    """What a render tells besides its audio: `clipped` counts the chip's channel samples held at its 16-bit
    limit (the voices' sum, the output with echo, or both), of `samples` it made; `overshoot` counts output
    samples cut at full scale after the effects and resampling."""

    clipped: int = 0
    samples: int = 0
    overshoot: int = 0

    def warning(self, preset: Preset) -> str:
        """What to tell a user whose render clipped, and what to change."""
        parts = []
        if self.clipped:
            parts.append(f"the chip clipped {self.clipped} of the {self.samples} samples it rendered "
                         f"({100 * self.clipped / max(self.samples, 1):.2g}%) at its 16-bit limit")
        if self.overshoot:
            parts.append(f"{self.overshoot} samples went past full scale after the effects or resampling")
        return (f"{' and '.join(parts)}; lower the role or master volumes (or the effects' gain) in "
                f"{preset.path or preset.name}")


def render_piece(piece: Piece, preset: Preset, sample_rate: int = 32000, tail: bool = True,
                 stats: RenderStats | None = None, parallel: bool = False) -> np.ndarray:
    """Render the whole piece: float32, shape (frames, 2), values in [-1, 1].

    With `tail` the audio runs on past the last note's end until releases, echo and effects have died
    away; without it, it is exactly round(piece.end_time * sample_rate) frames. Deterministic: the same
    piece and preset give identical samples. `stats`, when given, gets the render's clip count added.
    `parallel` mixes the voices in a second process where it can (Mixer.blocks): for a process that has a
    core to spare, not for one of several workers.
    """
    check_sample_rate(sample_rate)
    mixer, music_end = _chip(piece, preset, tail)
    audio = mixer.output(preset.master_volume, parallel)
    if stats is not None:
        stats.clipped += mixer.clipped
        stats.samples += audio.size
    del mixer
    if tail:
        audio = audio[:_sounding_end(audio, music_end, SILENCE_LSB / 32768)]
    if preset.effects:
        audio = _apply_effects(audio, preset.effects, music_end if tail else None)
    if sample_rate != DSP_RATE:
        import soxr

        audio = soxr.resample(audio, DSP_RATE, sample_rate, quality="HQ").astype(np.float32, copy=False)
    if preset.effects and not np.isfinite(audio).all():
        raise ChiptuneError(f"{preset.path or preset.name}: the effects made samples that are not numbers (NaN "
                            "or infinity); check their parameters")
    if preset.effects or sample_rate != DSP_RATE:  # effects and resampling can overshoot; the DSP cannot
        if stats is not None:
            stats.overshoot += int(np.count_nonzero(np.abs(audio) > 1.0))
        np.clip(audio, -1.0, 1.0, out=audio)
    if not tail:
        audio = _fit_length(audio, round(piece.end_time * sample_rate))
    return audio


def _chip(piece: Piece, preset: Preset, tail: bool) -> tuple[Mixer, int]:
    """The piece's parts scheduled on the chip's mixer (sampler voices and plugin stems), and the sample
    where the music ends; with `tail` the mixer runs on until releases and echo can have died away."""
    music_end = round(piece.end_time * DSP_RATE)
    curves = EnvelopeCurves()
    parts = arrange(piece, drums=preset.drums)
    on_plugin = [preset.spec_for(part.role, part.program).plugin is not None for part in parts]
    stems = [_plugin_stem(part, preset.spec_for(part.role, part.program), music_end if tail else None)
             for part, plugin in zip(parts, on_plugin, strict=True) if plugin and part.notes]
    voices, assignments = plan_voices([p for p, plugin in zip(parts, on_plugin, strict=True) if not plugin],
                                      preset, curves)
    frames = music_end
    if tail:
        frames = max([music_end] + [a.end for a in assignments if a is not None] + [len(s.left) for s in stems])
        if preset.echo is not None:
            frames += preset.echo.tail_frames()
    mixer = Mixer(frames, preset.echo)
    for stem in stems:
        mixer.add(0, len(stem.left), stem.echo, stem)
    outputs = _Outputs(curves, voices, assignments)
    for voice, assignment in zip(voices, assignments, strict=True):
        if assignment is not None:  # the note sounds until its own end or until its voice is taken
            length = assignment.end - voice.start
            mixer.add(voice.start, assignment.end, voice.echo, partial(outputs.get, voice, length))
    return mixer, music_end


def chip_blocks(piece: Piece, preset: Preset, stats: RenderStats | None = None, parallel: bool = False
                ) -> Iterator[np.ndarray]:
    """render_piece(piece, preset) x 32768 for a preset without effects (32 kHz, with the tail), a block at
    a time: int32 (2, n) 16-bit values, in order, each valid only until the next is asked for.

    The music is passed on as the mixer makes it, so memory does not grow with the piece (a plugin role's
    part excepted: it is rendered whole, here, before this returns); only what rings on after the music's
    end is held, to be cut where it falls silent, and comes last as one block (a block never spans the
    music's end). `stats` is updated once the mix is done; `parallel` is render_piece's.
    """
    if preset.effects:
        raise ValueError("effects run over the whole piece: use render_piece")
    mixer, music_end = _chip(piece, preset, tail=True)
    return _chip_stream(mixer, music_end, preset.master_volume, stats, parallel)


def _chip_stream(mixer: Mixer, music_end: int, master: tuple[int, int], stats: RenderStats | None,
                 parallel: bool) -> Iterator[np.ndarray]:
    done, ringing = 0, []
    for block in mixer.blocks(master, parallel):
        n = block.shape[1]
        head = min(n, max(music_end - done, 0))
        if head:
            yield block[:, :head]
        if head < n:
            ringing.append(block[:, head:].copy())
        done += n
    if stats is not None:
        stats.clipped += mixer.clipped
        stats.samples += 2 * mixer.frames
    if ringing:
        tail = np.concatenate(ringing, axis=1)
        end = _sounding_end(tail.T, 0, SILENCE_LSB)  # in 16-bit values, as render_piece trims in float
        if end:
            yield tail[:, :end]


def plan_voices(parts: Sequence[Part], preset: Preset, curves: EnvelopeCurves | None = None
                ) -> tuple[list[VoiceNote], list[Assignment | None]]:
    """Every sampler note of the parts, in key-on order, with its voice (None: dropped by the 8-voice
    limit) and the sample where its output stops. All parts share the chip's 8 voices."""
    curves = curves or EnvelopeCurves()
    voices: list[VoiceNote] = []
    for part in parts:
        voices += _part_voices(part, preset.spec_for(part.role, part.program), curves)
    voices.sort(key=lambda v: (v.kon, -v.priority, -v.pitch))
    return voices, allocate_voices([VoiceRequest(v.kon, v.koff, v.end, v.priority) for v in voices])


def _part_voices(part: Part, spec: RoleSpec, curves: EnvelopeCurves) -> list[VoiceNote]:
    """Sampler voices for a part's notes (a drum kit maps each key to its own drum sound)."""
    priority = ROLE_PRIORITY[part.role]
    planned = []
    for note in part.notes:
        if spec.is_kit:
            hit = drum_hit(note.pitch)
            source, envelope, level = hit.sound, hit.envelope, spec.volume * hit.volume
            pitch = PITCH_ONE if source == "noise" else pitch_value(hit.ratio * sample_rate_of(source) / DSP_RATE)
            length = max(note.end - note.start, hit.hold)
        else:
            inst = INSTRUMENTS[spec.builtin_name]
            key = note.pitch + 12 * spec.octave
            ratio = inst.pitch_ratio(440.0 * 2 ** ((key - 69) / 12))
            while ratio * PITCH_ONE > PITCH_MAX + 0.5:  # above the pitch register's range: an octave down
                ratio /= 2
            envelope = spec.envelope if spec.envelope is not None else inst.envelope
            source, level, pitch = inst.name, spec.volume, pitch_value(ratio)
            length = note.end - note.start
            if pitch == 0:
                continue
        kon = round(note.start * DSP_RATE)
        koff = kon + max(round(length * DSP_RATE), MIN_HOLD)  # equal durations give equal holds
        gain = 127 * level * (0.4 + 0.6 * note.velocity / 127)
        left, right = round(gain * min(1.0, 1.0 - spec.pan)), round(gain * min(1.0, 1.0 + spec.pan))
        planned.append((kon, koff, source, pitch, envelope, left, right))
    longest: dict[Envelope, int] = {}
    for kon, koff, _, _, envelope, _, _ in planned:
        longest[envelope] = max(longest.get(envelope, 0), koff - kon - OUTPUT_DELAY + 1)
    for envelope, hold in longest.items():  # one curve per envelope, as long as its longest hold
        curves.held(envelope, hold)
    voices = []
    for kon, koff, source, pitch, envelope, left, right in planned:
        start = kon + OUTPUT_DELAY
        hold = koff - start + 1
        end = start + hold + curves.release_length(envelope, curves.level_at(envelope, hold))
        if source != "noise":
            audible = sample_source(source).audible_samples(pitch)
            if audible is not None:
                end = min(end, start + audible)
        voices.append(VoiceNote(kon, koff, end, source, pitch, envelope, left, right, spec.echo, priority))
    return voices


@dataclass(frozen=True)
class _Stem:
    """A part rendered by other means (a plugin), as a mixer signal from sample 0."""

    left: np.ndarray
    right: np.ndarray
    echo: bool

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.left, self.right


def _plugin_stem(part: Part, spec: RoleSpec, music_end: int | None) -> _Stem:
    """A plugin role's part at the DSP rate, 16-bit scale, with the role's octave, volume, pan and effects.

    The plugin plays in a separate process: if it crashes, this render fails with the plugin and role
    named, and the process rendering goes on. With a tail (music_end given) the stem runs until the plugin
    falls silent, then the role's effects ring out; without, it stops at the last note.
    """
    from .plugins import render_role

    assert spec.plugin is not None
    shift = 12 * spec.octave
    notes = [replace(n, pitch=n.pitch + shift) for n in part.notes if 0 <= n.pitch + shift <= 127]
    audio = render_role(spec.plugin, notes, DSP_RATE, controls=_control_messages(part, notes),
                        max_tail=None if music_end is not None else 0.0)
    if spec.effects:
        audio = _apply_effects(np.ascontiguousarray(audio), spec.effects, music_end)
    gain = 32768 * spec.volume
    if not np.isfinite(audio).all():  # the int16-scale stem below would turn them into full-scale clicks
        raise ChiptuneError(f"{spec.plugin.where()}: the plugin or its effects made samples that are not "
                            "numbers (NaN or infinity); check their parameters")
    # Far past full scale is clipping whatever the volume; bounded, the voices' int32 sum cannot wrap.
    audio = np.clip(audio, -STEM_LIMIT, STEM_LIMIT)
    left = np.rint(audio[:, 0] * (gain * min(1.0, 1.0 - spec.pan))).astype(np.int32)
    right = np.rint(audio[:, 1] * (gain * min(1.0, 1.0 + spec.pan))).astype(np.int32)
    return _Stem(left, right, spec.echo)


def _control_messages(part: Part, notes: Sequence[Note]) -> list[tuple[bytes, float]]:
    """The part's controls as MIDI for its plugin, on the channel its notes go to (10 for drums, else 1).
    Controls after the part's last note-off change nothing that sounds, and would only lengthen the render."""
    if not notes:
        return []
    last = max(n.end for n in notes)
    channel = DRUM_CHANNEL if notes[0].is_drum else 0
    return [(bytes([c.data[0] | channel, *c.data[1:]]), c.time) for c in part.controls if c.time <= last]


class _Outputs:
    """Voice outputs of one render, shared by notes that are sample-for-sample the same.

    A sampled note's output depends only on its instrument, pitch value, envelope, key-off point and
    volumes (every key-on restarts the voice), and music repeats itself, so most notes are copies of
    earlier ones; interpolated streams likewise depend only on instrument and pitch. The render's notes
    are all known beforehand, so each output is kept only while a later note will use it, and each stream
    until the last note at its pitch has been made: what is let go is memory the next ones reuse, where
    fresh memory costs the kernel a page fault per 4 KiB. Noise notes depend on when they play and are not
    shared.
    """

    LIMIT = 1 << 22  # samples of note outputs kept at most (32 MiB of left/right pairs)

    def __init__(self, curves: EnvelopeCurves, voices: Sequence[VoiceNote],
                 assignments: Sequence[Assignment | None]) -> None:
        self.curves = curves
        self.kept: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.size = 0
        self.uses: Counter[tuple] = Counter()  # notes still to be made, per output and per stream
        self.longest: dict[tuple[str, int], int] = {}  # each stream is made once, as long as it is needed
        for voice, assignment in zip(voices, assignments, strict=True):
            # a note that sounds (one stolen before it is heard is never asked for)
            if assignment is not None and assignment.end > voice.start and voice.source != "noise":
                key = (voice.source, voice.pitch)
                self.longest[key] = max(self.longest.get(key, 0), voice.end - voice.start)
                self.uses[key] += 1
                self.uses[_output_key(voice)] += 1
        self.streams: dict[tuple[str, int], np.ndarray] = {}

    def stream(self, source: str, pitch: int, n: int) -> np.ndarray:
        key = (source, pitch)
        out = self.streams.get(key)
        if out is None or len(out) < n:
            out = sample_source(source).stream(pitch, max(n, self.longest.get(key, 0)))
            self.streams[key] = out
        return out[:n]

    def get(self, voice: VoiceNote, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Left and right output (VOLL/VOLR applied) of the voice's first n samples (each note's once)."""
        if voice.source == "noise":
            stream = noise_stream(NOISE_CLOCK, voice.start, n)
            return _stereo(self.curves.apply(stream, voice.envelope, voice.hold), voice)
        key = _output_key(voice)
        later = self._used(key)
        pair = self.kept.get(key)
        if pair is None or len(pair[0]) < n:
            # a note used again is made whole, so that a copy cut short by a steal can share it
            full = max(n, voice.end - voice.start) if later else n
            stream = self.stream(voice.source, voice.pitch, full)
            pair = _stereo(self.curves.apply(stream, voice.envelope, voice.hold), voice)
            if later and self.size + full <= self.LIMIT:
                self.size += full - (len(self.kept[key][0]) if key in self.kept else 0)
                self.kept[key] = pair
        if not later and key in self.kept:
            self.size -= len(self.kept.pop(key)[0])
        if not self._used((voice.source, voice.pitch)):
            self.streams.pop((voice.source, voice.pitch), None)
        return pair[0][:n], pair[1][:n]

    def _used(self, key: tuple) -> int:
        """Count one use of `key`; how many notes will still use it."""
        self.uses[key] -= 1
        return self.uses[key]


def _output_key(voice: VoiceNote) -> tuple:
    """What a sampled note's output depends on."""
    return (voice.source, voice.pitch, voice.envelope, voice.hold, voice.left, voice.right)


def _stereo(out: np.ndarray, voice: VoiceNote) -> tuple[np.ndarray, np.ndarray]:
    """Apply the voice's VOLL/VOLR: (out * vol) >> 7 per side (one array when they are equal). `out` is
    the voice's own (it is scaled in place)."""
    if voice.right == voice.left:
        out *= voice.left
        out >>= 7
        return out, out
    left = out * voice.left
    left >>= 7
    out *= voice.right
    out >>= 7
    return left, out


def _sounding_end(audio: np.ndarray, music_end: int, threshold: float) -> int:
    """One past the last frame (of (frames, 2) audio) after `music_end` louder than `threshold`, at least
    music_end."""
    tail = np.abs(audio[music_end:]).max(axis=1) if audio.shape[0] > music_end else np.zeros(0)
    loud = np.flatnonzero(tail > threshold)
    return music_end + (int(loud[-1]) + 1 if len(loud) else 0)


def _effects_tail_seconds(effects: Sequence[EffectSpec]) -> float:
    """A generous bound on how long the effects ring after the input stops (reverb and delay)."""
    seconds = 0.0
    for effect in effects:
        params = dict(effect.params)
        if effect.type == "Reverb":
            seconds += REVERB_TAIL_SECONDS[0] + REVERB_TAIL_SECONDS[1] * float(params.get("room_size", 0.5))
        elif effect.type == "Delay":
            delay, feedback = float(params.get("delay_seconds", 0.5)), abs(float(params.get("feedback", 0.0)))
            repeats = 1 if feedback <= 1e-4 else math.log(EFFECT_SILENCE) / math.log(min(feedback, 0.999))
            seconds += delay * (repeats + 1)
    return min(seconds, MAX_EFFECT_TAIL_SECONDS)


def _apply_effects(audio: np.ndarray, effects: Sequence[EffectSpec], music_end: int | None) -> np.ndarray:
    """Run the preset's pedalboard chain at 32 kHz; with a tail (music_end given), let it ring out and trim."""
    from pedalboard import Pedalboard

    board = Pedalboard([make_effect(e) for e in effects])
    if music_end is not None:
        pad = round(_effects_tail_seconds(effects) * DSP_RATE)
        audio = np.concatenate((audio, np.zeros((pad, 2), dtype=np.float32)))
    processed = np.asarray(board(audio, DSP_RATE), dtype=np.float32)
    if music_end is not None:
        processed = processed[:_sounding_end(processed, min(music_end, len(processed)), EFFECT_SILENCE)]
    return processed


def _fit_length(audio: np.ndarray, frames: int) -> np.ndarray:
    if audio.shape[0] >= frames:
        return audio[:frames]
    return np.concatenate((audio, np.zeros((frames - audio.shape[0], 2), dtype=np.float32)))


# -------------------------------------------------------------------------------------------------- files

OUTPUT_SUFFIXES = (".wav", ".ogg")


def check_output_path(path: str | Path) -> Path:
    """The output path, checked before any work: a .wav or .ogg name in an existing folder."""
    p = Path(path)
    if p.name.lower() in OUTPUT_SUFFIXES:
        raise ChiptuneError(f"{p}: name the file, e.g. {p.with_name('theme' + p.name)}")
    if p.name.startswith("."):
        raise ChiptuneError(f"{p}: a hidden file name; game engines skip those (use e.g. {p.name[1:]})")
    if p.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ChiptuneError(f"{p}: unsupported output format {p.suffix or '(none)'!r} (use .wav or .ogg)")
    if str(p.parent) and not p.parent.is_dir():
        raise ChiptuneError(f"{p}: folder {p.parent} does not exist")
    if p.is_dir():
        raise ChiptuneError(f"{p}: is a folder; name the file to write")
    return p
