"""Voice allocation: which of the DSP's 8 voices plays each note, decided up front on the whole note list.

The stealing rule, applied to notes in key-on order (at one key-on sample, higher priority first):
1. a free voice (silent: never used, or its note has fully died away), lowest voice number first;
2. otherwise a voice whose note is already keyed off but still releasing, the one keyed off earliest;
3. otherwise a held voice whose note started earlier and has priority no higher than the new one: the
   lowest priority first, then the note that started earliest (notes keyed on together never steal from
   each other, so of a chord too big for the free voices the first-listed notes play);
4. otherwise the new note is dropped (every voice holds a more important note).
A taken voice's old note stops at the new key-on, as on the chip, where KON restarts the envelope from 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .dsp import VOICE_COUNT


@dataclass(frozen=True, slots=True)
class VoiceRequest:
    """A note asking for a voice: key-on and key-off samples, when it falls silent by itself, its priority."""

    kon: int
    koff: int
    end: int
    priority: int


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where a note plays: the voice and the sample at which its output stops (its end or a steal)."""

    voice: int
    end: int


def allocate_voices(requests: Sequence[VoiceRequest], voices: int = VOICE_COUNT) -> list[Assignment | None]:
    """Assign voices to notes by the module's stealing rule; None for a dropped note.

    Ties keep the input order, so callers decide which of two equal notes wins by how they list them.
    """
    order = sorted(range(len(requests)), key=lambda i: (requests[i].kon, -requests[i].priority))
    playing: list[int | None] = [None] * voices
    ends = [r.end for r in requests]
    result: list[Assignment | None] = [None] * len(requests)
    for i in order:
        req = requests[i]
        chosen = _free_voice(playing, ends, req.kon)
        if chosen is None:
            chosen = _releasing_voice(playing, requests, req.kon)
        if chosen is None:
            chosen = _stealable_voice(playing, requests, req)
        if chosen is None:
            continue
        old = playing[chosen]
        if old is not None and ends[old] > req.kon:
            ends[old] = req.kon
            result[old] = Assignment(chosen, req.kon)
        playing[chosen] = i
        result[i] = Assignment(chosen, req.end)
    return result


def _free_voice(playing: list[int | None], ends: list[int], kon: int) -> int | None:
    for v, note in enumerate(playing):
        if note is None or ends[note] <= kon:
            return v
    return None


def _releasing_voice(playing: list[int | None], requests: Sequence[VoiceRequest], kon: int) -> int | None:
    best = None
    for v, note in enumerate(playing):
        if note is not None and requests[note].koff <= kon and (
                best is None or requests[note].koff < requests[playing[best]].koff):
            best = v
    return best


def _stealable_voice(playing: list[int | None], requests: Sequence[VoiceRequest], new: VoiceRequest
                     ) -> int | None:
    best = None
    best_key: tuple[int, int] | None = None
    for v, note in enumerate(playing):
        if note is None or requests[note].priority > new.priority or requests[note].kon >= new.kon:
            continue
        key = (requests[note].priority, requests[note].kon)
        if best_key is None or key < best_key:
            best, best_key = v, key
    return best
