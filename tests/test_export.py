"""Files as readers see them: mutagen/ffprobe read the Vorbis comments, an independent RIFF reader reads the
smpl chunk, Godot's .import keeps its uid, split clips join, exports are all-or-nothing, loudness lands."""

from __future__ import annotations

import configparser
import io
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import types
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from mutagen.oggvorbis import OggVorbis
from test_loops import RATE, make_piece, max_jump, toy_render

from chiptune_forge import export
from chiptune_forge.cli import main
from chiptune_forge.errors import ChiptuneError
from chiptune_forge.export import (
    PCM_BLOCK,
    export_track,
    file_sha256,
    fit_ceiling,
    measure_loudness,
    normalize,
    true_peak_db,
    write_ogg,
    write_wav,
)
from chiptune_forge.loops import TrackAudio, render_track
from chiptune_forge.midi import Note, Piece, read_midi, write_midi
from chiptune_forge.presets import load_preset
from chiptune_forge.render import render_piece


@pytest.fixture(scope="module")
def track() -> TrackAudio:
    """1 intro bar + 2 body bars at 137 qpm (loop frames not a round number), normalized to -16 LUFS."""
    raw = render_track(make_piece(bars=3, qpm=137.0, seed=5), toy_render, RATE, intro_bars=1)
    return normalize(raw)[0]


@pytest.fixture(scope="module")
def exported(track, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    export_track(track, out, "theme", ("ogg", "wav"), {"midi_sha256": "00ff"}, godot_import=True, split=True)
    return out


def riff_chunks(data: bytes) -> dict[str, bytes]:
    """A reader written from the RIFF layout, independent of the writer: chunk id -> payload."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    chunks, pos = {}, 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4].decode("ascii"), struct.unpack("<I", data[pos + 4:pos + 8])[0]
        chunks[cid] = data[pos + 8:pos + 8 + size]
        pos += 8 + size + (size & 1)
    assert pos == len(data)
    return chunks


def read_smpl_loops(payload: bytes) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    header = struct.unpack("<9I", payload[:36])
    loops = [struct.unpack("<6I", payload[36 + 24 * i:60 + 24 * i]) for i in range(header[7])]
    return header, loops


# --------------------------------------------------------------------------------------------- OGG tags


def test_ogg_loop_comments(track, exported):
    path = exported / "theme.ogg"
    tags = OggVorbis(path).tags
    assert tags["LOOPSTART"] == [str(track.loop_start)]
    assert tags["LOOPLENGTH"] == [str(track.loop_length)]
    raw = path.read_bytes()
    # RPG Maker matches upper-case LOOPSTART=<digits> in the raw comment header.
    assert f"LOOPSTART={track.loop_start}".encode() in raw
    assert f"LOOPLENGTH={track.loop_length}".encode() in raw
    frames = sf.info(str(path)).frames
    assert frames == track.frames == track.loop_start + track.loop_length


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not installed")
def test_ffprobe_reads_the_comments(track, exported):
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-of", "json", "-show_streams", "-show_format", str(exported / "theme.ogg")],
        capture_output=True, text=True, check=True, timeout=30)
    info = json.loads(result.stdout)
    stream = info["streams"][0]
    tags = {k.upper(): v for k, v in {**info["format"].get("tags", {}), **stream.get("tags", {})}.items()}
    assert tags["LOOPSTART"] == str(track.loop_start)
    assert tags["LOOPLENGTH"] == str(track.loop_length)
    assert int(stream["sample_rate"]) == RATE
    assert int(stream["duration_ts"]) == track.frames


# ------------------------------------------------------------------------------------------- WAV smpl


def test_wav_smpl_chunk(track, exported):
    data = (exported / "theme.wav").read_bytes()
    chunks = riff_chunks(data)
    fmt = struct.unpack("<HHIIHH", chunks["fmt "][:16])
    assert fmt[0] == 1 and fmt[1] == 2 and fmt[2] == RATE and fmt[5] == 16  # PCM, stereo, 16-bit
    assert len(chunks["data"]) == track.frames * 4
    header, loops = read_smpl_loops(chunks["smpl"])
    assert header == (0, 0, 31250, 60, 0, 0, 0, 1, 0)  # 1e9 / 32000 ns per sample, one loop
    assert loops == [(0, 0, track.loop_start, track.loop_end - 1, 0, 0)]  # forward, end inclusive, forever
    with wave.open(str(exported / "theme.wav")) as w:
        assert (w.getnframes(), w.getframerate(), w.getsampwidth()) == (track.frames, RATE, 2)
    audio, _ = sf.read(str(exported / "theme.wav"), dtype="float32")
    assert np.abs(audio - track.audio).max() <= 0.5 / 32768


def test_wav_keeps_16_bit_samples_and_rounds_to_nearest(tmp_path):
    """The sampler's output is a 16-bit value / 32768: a WAV keeps it exactly. Anything else rounds to the
    nearest step (not down, which would offset the signal by half a step), clipped to 16 bits."""
    # longer than one conversion block and not a multiple of it: every block boundary keeps its samples
    samples = np.random.default_rng(3).integers(-32768, 32768, size=(2 * PCM_BLOCK + 77, 2)).astype(np.int16)
    write_wav(tmp_path / "exact.wav", samples.astype(np.float32) / 32768, RATE, None)
    assert np.array_equal(sf.read(str(tmp_path / "exact.wav"), dtype="int16")[0], samples)
    edges = np.array([[1.5, -1.5], [1.0, -1.0], [0.6 / 32768, -0.4 / 32768], [-0.6 / 32768, 2.4 / 32768]],
                     dtype=np.float32)
    write_wav(tmp_path / "edges.wav", edges, RATE, (1, 2))
    assert sf.read(str(tmp_path / "edges.wav"), dtype="int16")[0].tolist() == [
        [32767, -32768], [32767, -32768], [1, 0], [-1, 2]]
    _, loops = read_smpl_loops(riff_chunks((tmp_path / "edges.wav").read_bytes())["smpl"])
    assert loops == [(0, 0, 1, 2, 0, 0)]


# -------------------------------------------------------------------------------------- sidecar, Godot


def test_sidecar(track, exported):
    data = json.loads((exported / "theme.json").read_text())
    assert data["midi_sha256"] == "00ff"
    assert data["files"] == ["theme.ogg", "theme.wav"]
    assert (data["loop_start_frames"], data["loop_length_frames"], data["loop_end_frames"]) == (
        track.loop_start, track.loop_length, track.frames)
    assert data["loop_start_seconds"] == track.loop_start / RATE
    assert data["loop_end_seconds"] == track.frames / RATE
    assert (data["sample_rate"], data["qpm"], data["bars"], data["intro_bars"]) == (RATE, 137.0, 2, 1)
    assert data["loudness_lufs"] == pytest.approx(-16.0, abs=0.05)
    assert data["true_peak_dbtp"] <= -1.0
    assert data["split"] == {"intro": ["theme_intro.ogg", "theme_intro.wav"],
                             "loop": ["theme_loop.ogg", "theme_loop.wav"]}


def read_import(path: Path) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read_string(path.read_text())
    return cfg


def test_godot_import_settings(track, exported):
    ogg = read_import(exported / "theme.ogg.import")
    assert ogg["remap"]["importer"] == '"oggvorbisstr"'
    assert ogg["params"]["loop"] == "true"
    assert float(ogg["params"]["loop_offset"]) == track.loop_start / RATE  # full precision
    wav = read_import(exported / "theme.wav.import")
    assert wav["remap"]["importer"] == '"wav"'
    assert dict(wav["params"]) == {"edit/loop_mode": "2", "edit/loop_begin": str(track.loop_start),
                                   "edit/loop_end": str(track.frames)}  # Godot plays the end exclusive
    loop_clip = read_import(exported / "theme_loop.ogg.import")
    assert (loop_clip["params"]["loop"], loop_clip["params"]["loop_offset"]) == ("true", "0.0")
    assert read_import(exported / "theme_intro.ogg.import")["params"]["loop"] == "false"


def test_godot_uid_survives_a_rebuild(track, tmp_path):
    (tmp_path / "theme.ogg.import").write_text(
        '[remap]\n\nimporter="oggvorbisstr"\ntype="AudioStreamOggVorbis"\nuid="uid://b4k2x7q1m0z9a"\n'
        'path="res://.godot/imported/theme.ogg-0.oggvorbisstr"\n\n[params]\n\nloop=false\nloop_offset=0\n')
    export_track(track, tmp_path, "theme", godot_import=True)
    cfg = read_import(tmp_path / "theme.ogg.import")
    assert cfg["remap"]["uid"] == '"uid://b4k2x7q1m0z9a"'
    assert cfg["params"]["loop"] == "true"


# ------------------------------------------------------------------------------------------ split clips


def test_split_clips_join_seamlessly(track, exported):
    s, n = track.loop_start, track.loop_length
    whole, _ = sf.read(str(exported / "theme.wav"), dtype="int16")
    intro, _ = sf.read(str(exported / "theme_intro.wav"), dtype="int16")
    body, _ = sf.read(str(exported / "theme_loop.wav"), dtype="int16")
    assert (len(intro), len(body)) == (s, n)
    assert np.array_equal(np.concatenate([intro, body]), whole)
    _, loops = read_smpl_loops(riff_chunks((exported / "theme_loop.wav").read_bytes())["smpl"])
    assert loops == [(0, 0, 0, n - 1, 0, 0)]
    assert "smpl" not in riff_chunks((exported / "theme_intro.wav").read_bytes())

    intro_ogg, _ = sf.read(str(exported / "theme_intro.ogg"), dtype="float32")
    body_ogg, _ = sf.read(str(exported / "theme_loop.ogg"), dtype="float32")
    assert (len(intro_ogg), len(body_ogg)) == (s, n)
    chained = np.concatenate([intro_ogg, body_ogg, body_ogg])
    limit = max_jump(body_ogg)
    assert max_jump(chained[s - 1:s + 1]) <= limit
    assert max_jump(chained[s + n - 1:s + n + 1]) <= limit
    assert np.abs(chained[:s + n] - track.audio).max() < 0.05  # codec error, no gap or shift
    tags = OggVorbis(exported / "theme_loop.ogg").tags
    assert (tags["LOOPSTART"], tags["LOOPLENGTH"]) == (["0"], [str(n)])
    assert "LOOPSTART" not in OggVorbis(exported / "theme_intro.ogg").tags


def test_split_without_intro_writes_only_the_loop(tmp_path):
    raw = render_track(make_piece(bars=2), toy_render, RATE)
    paths = export_track(raw, tmp_path, "calm", ("wav",), split=True)
    assert sorted(p.name for p in paths) == ["calm.json", "calm.wav", "calm_loop.wav"]


def test_jingle_has_no_loop_metadata(tmp_path):
    jingle = render_track(make_piece(bars=2), toy_render, RATE, loop=False)
    export_track(jingle, tmp_path, "fanfare", ("ogg", "wav"), godot_import=True, split=True)
    assert "LOOPSTART" not in OggVorbis(tmp_path / "fanfare.ogg").tags
    assert "smpl" not in riff_chunks((tmp_path / "fanfare.wav").read_bytes())
    assert not (tmp_path / "fanfare_loop.ogg").exists()
    assert read_import(tmp_path / "fanfare.ogg.import")["params"]["loop"] == "false"
    assert read_import(tmp_path / "fanfare.wav.import")["params"]["edit/loop_mode"] == "1"
    data = json.loads((tmp_path / "fanfare.json").read_text())
    assert data["loop"] is False and data["loop_start_frames"] is None and data["loop_end_seconds"] is None


# ------------------------------------------------------------------------------------------- atomicity


def test_failed_export_leaves_previous_files_untouched(track, tmp_path, monkeypatch):
    first = export_track(track, tmp_path, "theme", ("ogg", "wav"))
    before = {p.name: p.read_bytes() for p in first}
    seen: list[str] = []
    write_ogg_real = export.WRITERS["ogg"]

    def spy_ogg(path, audio, rate, loop):
        seen.append(path.name)
        write_ogg_real(path, audio, rate, loop)

    def broken_wav(path, audio, rate, loop):
        seen.append(path.name)
        path.write_bytes(b"RIFF half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(export.WRITERS, "ogg", spy_ogg)
    monkeypatch.setitem(export.WRITERS, "wav", broken_wav)
    louder = TrackAudio(track.audio * 0.5, RATE, track.loop_start, track.loop_length, 137.0, 2, 1)
    with pytest.raises(ChiptuneError, match=r"theme\.wav: cannot write \(No space left on device\)"):
        export_track(louder, tmp_path, "theme", ("ogg", "wav"))
    assert seen == [".theme.ogg.partial", ".theme.wav.partial"]  # names no engine takes for audio
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_unwritable_destination(track, tmp_path):
    blocker = tmp_path / "music"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(ChiptuneError, match=re.escape(f"{blocker}: cannot create the folder")):
        export_track(track, blocker, "theme")
    with pytest.raises(ChiptuneError, match=re.escape(f"{blocker / 'sub'}: cannot create the folder")):
        export_track(track, blocker / "sub", "theme")


@pytest.mark.parametrize(("name", "formats", "rate", "message"), [
    ("theme", ("mp3",), RATE, "unsupported format 'mp3'"),
    ("../theme", ("ogg",), RATE, "plain file name"),
    (".theme", ("ogg",), RATE, "plain file name"),
    ("theme", (), RATE, "no output format"),
    ("theme", ("ogg",), 12345, "unsupported sample rate 12345 Hz"),
])
def test_bad_export_requests_write_nothing(track, tmp_path, name, formats, rate, message):
    odd = TrackAudio(track.audio, rate, track.loop_start, track.loop_length, 137.0, 2, 1)
    with pytest.raises(ChiptuneError, match=message):
        export_track(odd, tmp_path / "out", name, formats)
    assert not (tmp_path / "out").exists()


def test_long_vorbis_write_does_not_crash(tmp_path):
    """One encoder call with minutes of audio overflows libvorbis's stack; write_ogg feeds it in chunks."""
    frames = 80 * RATE  # 10 MB of floats in one call: past the default 8 MB stack
    audio = np.zeros((frames, 2), np.float32)
    audio[::97] = 0.01
    write_ogg(tmp_path / "long.ogg", audio, RATE, (0, frames))
    assert sf.info(str(tmp_path / "long.ogg")).frames == frames


def test_the_same_audio_gives_the_same_file_bytes(track, tmp_path):
    for folder in ("first", "again"):
        export._last_vorbis.clear()  # encode each time rather than reuse the last encode
        export_track(track, tmp_path / folder, "theme", formats=("ogg", "wav"))
    for name in ("theme.ogg", "theme.wav", "theme.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name


def test_file_sha256(tmp_path):
    (tmp_path / "a.mid").write_bytes(b"abc")  # the FIPS 180-2 test vector
    assert file_sha256(tmp_path / "a.mid") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ---------------------------------------------------------------------------------------------- loudness


def test_true_peak_sees_between_samples():
    t = np.arange(RATE)
    x = 0.5 * np.sin(2 * np.pi * 0.25 * t + np.pi / 4)  # samples sit at +-0.354, the wave peaks at 0.5
    audio = np.stack([x, x], axis=1).astype(np.float32)
    assert 20 * math.log10(np.abs(audio).max()) == pytest.approx(20 * math.log10(0.5) - 3.01, abs=0.05)
    assert true_peak_db(audio, RATE) == pytest.approx(20 * math.log10(0.5), abs=0.1)
    assert true_peak_db(np.zeros((100, 2), np.float32), RATE) == -math.inf


@pytest.mark.parametrize("target", [-16.0, -23.0])
def test_normalize_reaches_the_target(target):
    raw = render_track(make_piece(bars=2, seed=2), toy_render, RATE)
    out, gain = normalize(raw, target_lufs=target)
    assert measure_loudness(out) == pytest.approx(target, abs=0.05)
    assert gain == pytest.approx(target - measure_loudness(raw), abs=1e-6)


def test_true_peak_ceiling_holds_after_encoding(tmp_path):
    raw = render_track(make_piece(bars=2, seed=4), toy_render, RATE)
    out, gain = normalize(raw, target_lufs=-6.0, true_peak_db=-1.0)  # too hot: the ceiling wins
    assert gain < -6.0 - measure_loudness(raw)
    export_track(out, tmp_path, "hot", ("ogg", "wav"))
    for name in ("hot.ogg", "hot.wav"):
        decoded, _ = sf.read(str(tmp_path / name), dtype="float32")
        assert true_peak_db(decoded, RATE, out.loop_start) <= -1.0
    assert true_peak_db(out.audio, RATE, out.loop_start) <= -1.0


def test_same_gain_keeps_relative_levels():
    quiet = render_track(make_piece(bars=2, seed=6), lambda p, r: toy_render(p, r) * 0.25, RATE)
    loud = render_track(make_piece(bars=3, seed=7), toy_render, RATE)
    shared = min(fit_ceiling(t, -16.0 - measure_loudness(loud)) for t in (quiet, loud))
    a, ga = normalize(quiet, gain_db=shared)
    b, gb = normalize(loud, gain_db=shared)
    assert ga == gb == shared
    before = measure_loudness(loud) - measure_loudness(quiet)
    assert measure_loudness(b) - measure_loudness(a) == pytest.approx(before, abs=0.01)
    assert measure_loudness(a) < measure_loudness(b) <= -16.0 + 1e-6
    for t in (a, b):
        assert true_peak_db(t.audio, RATE, t.loop_start) <= -1.0


def test_short_loop_is_measured_over_repeats():
    body = np.tile(np.sin(2 * np.pi * 500 * np.arange(RATE // 8) / RATE)[:, None] * 0.3, (1, 2))
    short = TrackAudio(body.astype(np.float32), RATE, 0, RATE // 8, 120.0, 1, 0)
    long = TrackAudio(np.tile(body, (16, 1)).astype(np.float32), RATE, 0, 2 * RATE, 120.0, 1, 0)
    assert measure_loudness(short) == pytest.approx(measure_loudness(long), abs=0.1)


def test_silent_track_is_left_alone():
    silent = TrackAudio(np.zeros((RATE, 2), np.float32), RATE, 0, RATE, 120.0, 1, 0)
    out, gain = normalize(silent)
    assert gain == 0.0 and not out.audio.any()
    assert measure_loudness(silent) == -math.inf


# ------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def midi_file(tmp_path) -> Path:
    path = tmp_path / "in.mid"
    write_midi(make_piece(bars=3, seed=2), path)
    return path


def test_render_cli_writes_a_tagged_loop(midi_file, tmp_path):
    out = tmp_path / "music"
    out.mkdir()
    assert main(["render", str(midi_file), "-o", str(out / "theme.ogg"), "--loop", "--intro-bars", "1",
                 "--bars", "2", "--loudness", "-18", "--godot-import", "--split"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "theme.json", "theme.ogg", "theme.ogg.import", "theme_intro.ogg", "theme_intro.ogg.import",
        "theme_loop.ogg", "theme_loop.ogg.import"]
    tags = OggVorbis(out / "theme.ogg").tags
    assert (tags["LOOPSTART"], tags["LOOPLENGTH"]) == (["64000"], ["128000"])  # 120 qpm: 2 s per bar
    data = json.loads((out / "theme.json").read_text())
    assert data["midi_sha256"] == file_sha256(midi_file)
    assert (data["bars"], data["intro_bars"], data["preset"]) == (2, 1, "snes")
    assert data["loudness_lufs"] == pytest.approx(-18.0, abs=0.05)


def test_render_cli_jingle_wav(midi_file, tmp_path):
    assert main(["render", str(midi_file), "-o", str(tmp_path / "win.wav")]) == 0
    audio, rate = sf.read(str(tmp_path / "win.wav"), dtype="int16")
    assert rate == RATE and not audio[-1].any()
    assert "smpl" not in riff_chunks((tmp_path / "win.wav").read_bytes())


def test_a_plain_render_holds_the_chips_own_output_and_no_sidecar(midi_file, tmp_path, capsys):
    assert main(["render", str(midi_file), "-o", str(tmp_path / "win.wav")]) == 0
    preset = load_preset("snes")
    chip = render_track(read_midi(midi_file), lambda p, rate: render_piece(p, preset, rate), RATE, loop=False)
    written, _ = sf.read(str(tmp_path / "win.wav"), dtype="int16")
    expected = np.clip(np.rint(chip.audio.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)
    assert np.array_equal(written, expected), "no gain: the samples the sampler made"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mid", "win.wav"]
    peak = 20 * math.log10(np.abs(chip.audio).max())
    assert f"jingle, the chip's level (sample peak {peak:.1f} dBFS); wrote win.wav" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--loudness", "-20"], ["--true-peak", "-3"]])
def test_render_normalizes_a_jingle_when_asked(midi_file, tmp_path, args):
    assert main(["render", str(midi_file), "-o", str(tmp_path / "win.wav"), *args]) == 0
    data = json.loads((tmp_path / "win.json").read_text())
    target, ceiling = (-20.0, -1.0) if "--loudness" in args else (-16.0, -3.0)
    assert data["loop"] is False and data["gain_db"] != 0
    assert data["true_peak_dbtp"] <= ceiling and data["loudness_lufs"] <= target + 0.05
    assert data["loudness_lufs"] >= target - 0.05 or data["true_peak_dbtp"] >= ceiling - 0.2, \
        "the gain stops at the target loudness or at the ceiling"


@pytest.mark.parametrize(("args", "message"), [
    (["--loop", "--intro-bars", "2", "--bars", "2"], "in.mid: loop of 2 intro + 2 body bars is longer than the piece"),
    (["--loop", "--intro-bars", "3"], "leaves no body"),
    (["--intro-bars", "1"], "--intro-bars needs --loop"),
    (["--loop", "--sample-rate", "22050"], "unsupported sample rate 22050 Hz"),
    (["--loop", "--loudness", "3"], "--loudness 3 LUFS is out of range"),
    (["--loop", "--true-peak", "0.5"], "--true-peak 0.5 dBTP is out of range"),
    (["--loop", "--true-peak", "-80"], "--true-peak -80 dBTP is out of range"),
    (["--split"], "--split needs --loop"),
])
def test_render_cli_refuses_bad_requests(midi_file, tmp_path, capsys, args, message):
    out = tmp_path / "music"
    out.mkdir()
    assert main(["render", str(midi_file), "-o", str(out / "theme.ogg"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not any(out.iterdir())


@pytest.mark.parametrize("args", [[], ["--loop"]])
def test_music_far_too_long_is_refused_before_rendering(tmp_path, capsys, args):
    """A stray note hours after the music would take minutes and gigabytes; say where it is instead."""
    midi = tmp_path / "gap.mid"
    write_midi(Piece([Note(60, 100, 0.0, 1.0), Note(62, 100, 5000.0, 5001.0)]), midi)
    assert main(["render", str(midi), "-o", str(tmp_path / "gap.ogg"), *args]) == 1
    err = capsys.readouterr().err
    assert f"{midi}: 500" in err and "s of music to render (the last note, pitch 62, ends at 5001 s)" in err
    assert not (tmp_path / "gap.ogg").exists()


def test_render_points_out_side_files_of_an_earlier_render(midi_file, tmp_path, capsys):
    out = tmp_path / "theme.ogg"
    assert main(["render", str(midi_file), "-o", str(out), "--loop", "--intro-bars", "1", "--split",
                 "--godot-import"]) == 0
    capsys.readouterr()
    assert main(["render", str(midi_file), "-o", str(out)]) == 0  # now a jingle: the old loop files are stale
    err = capsys.readouterr().err
    listed = ", ".join(str(tmp_path / f) for f in ("theme.ogg.import", "theme_intro.ogg", "theme_intro.ogg.import",
                                                    "theme_loop.ogg", "theme_loop.ogg.import", "theme.json"))
    assert f"warning: {listed} do not match this render and were left as they were" in err
    assert main(["render", str(midi_file), "-o", str(out), "--loop", "--intro-bars", "1", "--split",
                 "--godot-import"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_plain_render_points_out_only_a_sidecar_that_described_the_file_it_replaced(midi_file, tmp_path, capsys):
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.ogg"), "--loop"]) == 0
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.wav")]) == 0
    assert "warning" not in capsys.readouterr().err, "theme.json still describes theme.ogg, which is unchanged"
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.ogg")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'theme.json'} does not match this render and was left as it was" in err
    assert json.loads((tmp_path / "theme.json").read_text())["loop"] is True, "left as it was"


GODOT_OWN_IMPORT = """[remap]

importer="oggvorbisstr"
type="AudioStreamOggVorbis"
uid="uid://b8x2k4m1q0xyz"
path="res://.godot/imported/theme.ogg-123.oggvorbisstr"

[params]

loop=false
loop_offset=0
bpm=0
"""


def test_godot_settings_are_pointed_out_only_when_they_loop_the_file_differently(midi_file, tmp_path, capsys):
    (tmp_path / "theme.ogg.import").write_text(GODOT_OWN_IMPORT)
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.ogg")]) == 0
    assert "warning" not in capsys.readouterr().err, "Godot's defaults play a jingle as it is"
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.ogg"), "--loop"]) == 0
    assert f"warning: {tmp_path / 'theme.ogg.import'} does not match this render" in capsys.readouterr().err
    assert (tmp_path / "theme.ogg.import").read_text() == GODOT_OWN_IMPORT


@pytest.mark.parametrize("args", [["--loop"], ["--loudness", "-16"]])
def test_render_never_replaces_a_json_file_it_did_not_write(midi_file, tmp_path, capsys, args):
    (tmp_path / "theme.json").write_text('{"level": "data"}')
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.ogg"), *args]) == 1
    err = capsys.readouterr().err
    assert err == (f"chiptune-forge: error: {tmp_path / 'theme.json'}: exists and is not a sidecar chiptune-forge "
                   "wrote for theme.ogg; move it away or render to another name\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mid", "theme.json"]


def test_a_render_that_cannot_write_one_file_changes_none(midi_file, tmp_path, capsys):
    args = ["--loop", "--intro-bars", "1", "--split", "--godot-import"]
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.ogg"), *args]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "theme_loop.ogg").unlink()
    (tmp_path / "theme_loop.ogg").mkdir()
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.ogg"), *args, "--loudness", "-20"]) == 1
    assert capsys.readouterr().err == (f"chiptune-forge: error: {tmp_path / 'theme_loop.ogg'}: is a folder; cannot "
                                       "write the file there\n")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == {name: data for name, data in before.items() if name != "theme_loop.ogg"}


def test_a_wav_that_cannot_be_created_is_a_one_line_error(midi_file, tmp_path, capsys):
    (tmp_path / ".theme.wav.partial").mkdir()  # stands in for a folder the user may not write to
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.wav")]) == 1
    assert capsys.readouterr().err == (f"chiptune-forge: error: {tmp_path / 'theme.wav'}: cannot write "
                                       "(Is a directory)\n")
    assert not (tmp_path / "theme.wav").exists()


def test_render_in_another_format_says_the_earlier_file_is_no_longer_described(midi_file, tmp_path, capsys):
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.ogg"), "--loop"]) == 0
    capsys.readouterr()
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.wav"), "--loop"]) == 0
    assert f"warning: {tmp_path / 'theme.json'} now describes this render only; {tmp_path / 'theme.ogg'} from an " \
           "earlier render is no longer listed in it" in capsys.readouterr().err
    assert json.loads((tmp_path / "theme.json").read_text())["files"] == ["theme.wav"]
    assert main(["render", str(midi_file), "-o", str(tmp_path / "theme.wav"), "--loop"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_render_cli_refuses_a_folder_as_output(midi_file, tmp_path, capsys):
    folder = tmp_path / "theme.ogg"
    folder.mkdir()
    assert main(["render", str(midi_file), "-o", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err == f"chiptune-forge: error: {folder}: is a folder; name the file to write\n"
    assert not any(folder.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["in.mid", "theme.ogg"]


def test_render_cli_says_the_loudness_it_reached(midi_file, tmp_path, capsys):
    assert main(["render", str(midi_file), "-o", str(tmp_path / "loud.wav"), "--loudness", "-1"]) == 0
    out = capsys.readouterr().out
    reached = json.loads((tmp_path / "loud.json").read_text())["loudness_lufs"]
    assert reached < -1.5, "a -1 LUFS target is out of reach under a -1 dBTP ceiling"
    assert f"to {reached:.1f} LUFS (short of -1: held back by the -1 dBTP ceiling)" in out


def test_ctrl_c_during_an_encode_waits_for_it_then_stops_cleanly(track, tmp_path, monkeypatch, capsys) -> None:
    """libsndfile calls back into Python to write an in-memory file; Ctrl-C must not land inside that."""
    sent: list[bool] = []

    class InterruptedBuffer(io.BytesIO):
        def write(self, data) -> int:  # called by libsndfile, through a cffi callback
            if not sent:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(data)

    monkeypatch.setattr(export, "io", types.SimpleNamespace(BytesIO=InterruptedBuffer))
    export._last_vorbis.clear()
    with pytest.raises(KeyboardInterrupt):
        export_track(track, tmp_path / "out", "theme", ("ogg",))
    assert sent and not any((tmp_path / "out").iterdir())
    assert "Exception ignored" not in capsys.readouterr().err
