"""Small hand-built MIDI files for tests (written with mido, byte by byte where a test needs a broken one)."""

from __future__ import annotations

from pathlib import Path

import mido


def write_song(path: Path, tracks: list[list[tuple[int, mido.Message | mido.MetaMessage]]], tpb: int = 480,
               file_type: int = 1) -> Path:
    """Write tracks given as (absolute tick, message) lists; delta times are computed here."""
    mid = mido.MidiFile(type=file_type, ticks_per_beat=tpb)
    for events in tracks:
        track = mido.MidiTrack()
        now = 0
        for tick, msg in sorted(events, key=lambda e: e[0]):
            track.append(msg.copy(time=tick - now))
            now = tick
        mid.tracks.append(track)
    mid.save(str(path))
    return path


def notes_track(notes: list[tuple[int, int, int]], channel: int = 0, velocity: int = 90,
                tpb: int = 480) -> list[tuple[int, mido.Message]]:
    """(pitch, start_step, end_step) on the 16th-note grid -> note on/off events."""
    per_step = tpb // 4
    events: list[tuple[int, mido.Message]] = []
    for pitch, start, end in notes:
        events.append((start * per_step, mido.Message("note_on", note=pitch, velocity=velocity, channel=channel)))
        events.append((end * per_step, mido.Message("note_off", note=pitch, velocity=0, channel=channel)))
    return events


def tempo(tick: int, qpm: float) -> tuple[int, mido.MetaMessage]:
    return tick, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(qpm))


def time_signature(tick: int, num: int, den: int) -> tuple[int, mido.MetaMessage]:
    return tick, mido.MetaMessage("time_signature", numerator=num, denominator=den)


def simple_song(path: Path, bars: int = 8, qpm: float = 120.0) -> Path:
    """A few bars of a C-major arpeggio over a held bass: enough steps to survive the 80-step minimum."""
    notes = []
    for bar in range(bars):
        base = bar * 16
        notes.append((48 if bar % 2 == 0 else 43, base, base + 16))
        for i, p in enumerate((60, 64, 67, 72)):
            notes.append((p, base + 4 * i, base + 4 * i + 3))
    return write_song(path, [[tempo(0, qpm), time_signature(0, 4, 4)], notes_track(notes)])


def with_velocity_over_127(path: Path) -> Path:
    """Rewrite a file in place so that its first note-on's velocity byte is 200, as some writers produce:
    not valid MIDI, but readable. The file must have been written by this module (velocity 90, no running
    status), so the three bytes of that message are found as they are."""
    data = path.read_bytes()
    at = next(k for k in range(data.index(b"MTrk"), len(data) - 2)
              if data[k] & 0xF0 == 0x90 and data[k + 1] < 128 and data[k + 2] == 90)
    path.write_bytes(data[:at + 2] + bytes([200]) + data[at + 3:])
    return path
