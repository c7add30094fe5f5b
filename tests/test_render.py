"""render_piece and the render command: shapes, rates, exact timing, pitch, levels, errors."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from midi_factory import simple_song, with_velocity_over_127

from chiptune_forge.arrange import arrange
from chiptune_forge.cli import main
from chiptune_forge.errors import ChiptuneError
from chiptune_forge.export import export_track, write_jingle_wav
from chiptune_forge.loops import jingle_fade, jingle_piece, render_track
from chiptune_forge.midi import Note, Piece, read_midi, write_midi
from chiptune_forge.presets import Preset, RoleSpec, load_preset, shipped_names
from chiptune_forge.render import RenderStats, chip_blocks, plan_voices, render_piece
from chiptune_forge.snes.dsp import OUTPUT_DELAY, PITCH_MAX, PITCH_ONE
from chiptune_forge.snes.instruments import INSTRUMENTS


def song(bars: int = 4, beat: float = 0.5) -> Piece:
    """Dense test music: a melody in eighths, four-note chords on every beat and a bass line."""
    notes = []
    for bar in range(bars):
        root = (48, 45, 41, 43)[bar % 4]
        for k in range(4):
            t = (4 * bar + k) * beat
            notes += [Note(root + i, 96, t, t + 0.9 * beat) for i in (12, 16, 19, 24)]
            notes.append(Note(root - 12, 110, t, t + beat))
        for k in range(8):
            t = (4 * bar + k / 2) * beat
            notes.append(Note(72 + (3 * bar + 5 * k) % 12, 120, t, t + 0.45 * beat))
    return Piece(notes)


def without_drums(name: str) -> Preset:
    return dataclasses.replace(load_preset(name), drums=False)


@pytest.mark.parametrize("rate", [32000, 44100, 48000])
def test_output_rate_channels_and_length(rate: int) -> None:
    piece = song(2)
    exact = render_piece(piece, load_preset("snes"), rate, tail=False)
    assert exact.dtype == np.float32 and exact.ndim == 2 and exact.shape[1] == 2
    assert exact.shape[0] == round(piece.end_time * rate)
    with_tail = render_piece(piece, load_preset("snes"), rate)
    assert with_tail.shape[0] > exact.shape[0] + rate // 20  # releases and echo ring on
    assert np.abs(with_tail).max() <= 1.0 and np.abs(with_tail[-rate // 100:]).max() < 0.01


def test_unsupported_rates_are_refused() -> None:
    with pytest.raises(ChiptuneError, match="unsupported sample rate 22050 Hz"):
        render_piece(song(1), load_preset("snes"), 22050)


def test_rendering_is_deterministic() -> None:
    a = render_piece(song(2), load_preset("snes_dungeon"), 44100)
    b = render_piece(song(2), load_preset("snes_dungeon"), 44100)
    assert np.array_equal(a, b)


def test_a_note_starts_on_its_sample() -> None:
    audio = render_piece(Piece([Note(69, 100, 0.5, 0.8)]), without_drums("snes_dry"), tail=False)
    first = int(np.flatnonzero(np.abs(audio[:, 0]) > 0)[0])
    assert round(0.5 * 32000) <= first <= round(0.5 * 32000) + OUTPUT_DELAY + 2


def test_moving_music_by_whole_samples_moves_the_audio_exactly() -> None:
    piece = song(2)
    later = Piece([dataclasses.replace(n, start=n.start + 0.25, end=n.end + 0.25) for n in piece.notes])
    preset = without_drums("snes")  # with echo: the whole output stage is time-invariant
    a = render_piece(piece, preset)
    b = render_piece(later, preset)
    shift = round(0.25 * 32000)
    assert np.array_equal(b[shift:shift + len(a)], a) and not np.any(b[:shift])


@pytest.mark.parametrize("name", shipped_names())
def test_every_shipped_preset_renders_dense_music_without_clipping(name: str) -> None:
    stats = RenderStats()
    audio = render_piece(song(8), load_preset(name), 44100, stats=stats)
    peak = float(np.abs(audio).max())
    assert 0.1 < peak < 0.99 and stats.clipped == 0, "no clamp inside the DSP either (master volume hides it)"
    assert stats.overshoot == 0 and stats.samples > audio.size * 32000 / 44100 * 0.99


def test_a_render_counts_the_samples_it_clipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loud = tmp_path / "loud.toml"
    loud.write_text("".join(f"[roles.{role}]\nvolume = 1.0\n" for role in ("lead", "harmony", "bass", "drums"))
                    + "[master]\nvolume = 0.5\n")
    stats = RenderStats()
    audio = render_piece(song(4), load_preset(loud), stats=stats)
    assert float(np.abs(audio).max()) < 0.51, "clamped inside, then halved"
    at_limit = int(np.count_nonzero(np.abs(audio) == np.abs(audio).max()))
    assert stats.clipped >= at_limit > 100 and stats.clipped <= stats.samples == audio.size
    assert main(["render", str(write(tmp_path, song(4))), "-o", str(tmp_path / "out.wav"), "--preset",
                 str(loud)]) == 0
    err = capsys.readouterr().err
    assert re.search(rf"warning: {re.escape(str(tmp_path / 'out.wav'))}: the chip clipped \d+ of the \d+ samples it "
                     rf"rendered \([\d.]+%\) at its 16-bit limit; lower the role or master volumes \(or the "
                     rf"effects' gain\) in {re.escape(str(loud))}\n", err)
    capsys.readouterr()
    assert main(["render", str(write(tmp_path, song(4))), "-o", str(tmp_path / "ok.wav")]) == 0
    assert "clipped" not in capsys.readouterr().err


def test_render_warns_about_data_bytes_over_127(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loud = with_velocity_over_127(simple_song(tmp_path / "loud.mid", bars=2))
    assert main(["render", str(loud), "-o", str(tmp_path / "loud.wav")]) == 0
    assert f"warning: {loud}: data bytes above 127 (not valid MIDI) were read as 127\n" in capsys.readouterr().err
    assert (tmp_path / "loud.wav").is_file()


def test_effects_that_make_non_numbers_fail_the_render(tmp_path: Path) -> None:
    wild = tmp_path / "wild.toml"
    wild.write_text('[[effects]]\ntype = "Gain"\ngain_db = 1e9\n[[effects]]\ntype = "Reverb"\n')
    with pytest.raises(ChiptuneError, match=r"wild\.toml: the effects made samples that are not numbers"):
        render_piece(song(1), load_preset(wild))


@pytest.mark.parametrize("name", list(INSTRUMENTS))
def test_a4_is_440_hz_on_every_instrument(name: str) -> None:
    base = load_preset("snes_dry")
    inst = INSTRUMENTS[name]
    steady = dataclasses.replace(inst.envelope, sustain_level=7, sustain_rate=0)
    roles = dict(base.roles, lead=RoleSpec(f"builtin:{name}", steady, 0.5, 0.0, 0, False))
    audio = render_piece(Piece([Note(69, 100, 0.0, 1.2)]), dataclasses.replace(base, roles=roles, drums=False))
    x = audio[1000:33000, 0].astype(np.float64)
    size = 1 << 19
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), size))
    freqs = np.fft.rfftfreq(size, 1 / 32000)
    band = np.flatnonzero((freqs > 400) & (freqs < 480))
    i = band[np.argmax(spectrum[band])]
    a, b, c = np.log(spectrum[i - 1:i + 2])
    hz = (i + 0.5 * (a - c) / (a - 2 * b + c)) * 32000 / size
    assert abs(1200 * np.log2(hz / 440.0)) < 5.0


def test_out_of_range_notes_fold_into_the_pitch_register() -> None:
    """A note above the 14-bit pitch register plays whole octaves lower, at the highest octave that fits."""
    preset = without_drums("snes_dry")
    piece = Piece([Note(120, 100, 0.0, 0.3), Note(15, 100, 0.3, 0.6)])
    part = next(p for p in arrange(piece, drums=False) if any(n.pitch == 120 for n in p.notes))
    spec = preset.spec_for(part.role, part.program)
    inst = INSTRUMENTS[spec.builtin_name]
    ratio = inst.pitch_ratio(440.0 * 2 ** ((120 + 12 * spec.octave - 69) / 12))
    octaves = math.ceil(math.log2(ratio * PITCH_ONE / (PITCH_MAX + 0.5)))
    assert octaves >= 1  # the note is out of range to begin with
    voices, _ = plan_voices([part], preset)
    high = next(v for v in voices if v.kon == 0)
    assert high.pitch == round(PITCH_ONE * ratio / 2 ** octaves) <= PITCH_MAX
    audio = render_piece(piece, preset)
    assert np.abs(audio).max() > 0.01 and np.isfinite(audio).all()


def write(tmp_path: Path, piece: Piece) -> Path:
    path = tmp_path / "in.mid"
    write_midi(piece, path)
    return path


def test_render_command_writes_the_requested_rate(tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    assert main(["render", str(write(tmp_path, song(2))), "-o", str(out), "--preset", "snes_dry",
                 "--sample-rate", "44100"]) == 0
    info = soundfile.info(str(out))
    assert info.samplerate == 44100 and info.channels == 2 and info.subtype == "PCM_16"


def test_render_command_errors_leave_nothing_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    midi = write(tmp_path, song(1))
    out = tmp_path / "out.ogg"
    broken = tmp_path / "broken.toml"
    broken.write_text("[roles.lead]\nvolume = 7\n")
    assert main(["render", str(midi), "-o", str(out), "--preset", str(broken)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "broken.toml:2: roles.lead.volume: 7 is out of range" in err
    assert main(["render", str(midi), "-o", str(tmp_path / "out.mp3")]) == 1
    assert "use .wav or .ogg" in capsys.readouterr().err
    assert main(["render", str(midi), "-o", str(out), "--sample-rate", "8000"]) == 1
    assert "unsupported sample rate" in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == {midi, broken}


def test_rendering_never_imports_tensorflow() -> None:
    code = ("import sys\n"
            "from chiptune_forge.midi import Note, Piece\n"
            "from chiptune_forge.presets import load_preset\n"
            "from chiptune_forge.render import render_piece\n"
            "render_piece(Piece([Note(60, 100, 0.0, 0.5)]), load_preset('snes_dungeon'), 48000)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_plain_wav_render_loads_only_what_it_uses(tmp_path: Path) -> None:
    """Start-up is most of a render's time: the command leaves out the Ogg, resampling, plugin, manifest and
    model modules when it writes a WAV at the chip's rate."""
    midi = tmp_path / "tune.mid"
    write_midi(Piece([Note(60, 100, 0.0, 0.5), Note(64, 90, 0.5, 1.0)]), midi)
    code = ("import sys\n"
            "from chiptune_forge.cli import main\n"
            f"assert main(['render', {str(midi)!r}, '-o', {str(tmp_path / 'tune.wav')!r}]) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('soundfile', 'mutagen', 'soxr', 'pedalboard',"
            " 'tensorflow', 'keras') or m in ('chiptune_forge.plugins', 'chiptune_forge.manifest')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "tune.wav").is_file()


def test_a_corpus_piece_renders(corpus_dir: Path) -> None:
    piece = read_midi(corpus_dir / "Chrono_SNES_Chrono Trigger_Secret of the Forest.mid")
    audio = render_piece(piece, load_preset("snes"))
    assert piece.end_time * 32000 < len(audio) < (piece.end_time + 10) * 32000
    assert np.isfinite(audio).all() and 0.05 < np.abs(audio).max() < 1.0


@pytest.mark.parametrize("name", [n for n in shipped_names() if not load_preset(n).effects])
@pytest.mark.parametrize("bars", [None, 1])
def test_a_jingle_written_as_it_is_mixed_is_the_file_a_whole_render_writes(name: str, bars: int | None,
                                                                          tmp_path: Path) -> None:
    """The render command streams a plain WAV: the bytes must be those of the general path."""
    preset = load_preset(name)
    piece, _ = jingle_piece(song(2), 32000, bars=bars)
    track = render_track(piece, lambda p, rate: render_piece(p, preset, rate), 32000, loop=False)
    whole = export_track(track, tmp_path, "whole", ("wav",), sidecar=False)[0]
    stats = RenderStats()
    frames, peak = write_jingle_wav(tmp_path / "streamed.wav", chip_blocks(piece, preset, stats),
                                    round(piece.end_time * 32000), 32000)
    assert (tmp_path / "streamed.wav").read_bytes() == whole.read_bytes()
    assert frames == track.frames and peak == np.abs(track.audio).max()
    assert stats.samples > 2 * round(piece.end_time * 32000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.wav", "whole.wav"]  # nothing left aside


def test_a_jingle_whose_sound_stops_with_the_music_still_gets_its_fade(tmp_path: Path) -> None:
    piece = Piece([Note(60, 100, 0.0, 0.5)])
    blocks = [np.full((2, 16000), 1000, dtype=np.int32)]  # the music only: nothing rings on after it
    frames, peak = write_jingle_wav(tmp_path / "j.wav", iter(blocks), 16000, 32000)
    track = render_track(piece, lambda p, rate: np.full((16000, 2), 1000 / 32768, np.float32), 32000, loop=False)
    assert frames == track.frames == 16000 + jingle_fade(32000)
    export_track(track, tmp_path, "k", ("wav",), sidecar=False)
    assert (tmp_path / "j.wav").read_bytes() == (tmp_path / "k.wav").read_bytes()
    assert peak == 1000 / 32768


def test_a_plain_render_names_its_file_as_every_render_does(tmp_path: Path) -> None:
    midi = write(tmp_path, song(1))
    assert main(["render", str(midi), "-o", str(tmp_path / "Tune.WAV")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Tune.wav", "in.mid"]
