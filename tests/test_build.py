"""The build step: incremental stages, lock reproducibility, atomic assets, --check/--json, the example game."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from midi_factory import notes_track, simple_song, tempo, time_signature, with_velocity_over_127, write_song

from chiptune_forge.builder import CACHE_DIR, LOCK_NAME, build
from chiptune_forge.cli import main
from chiptune_forge.errors import ChiptuneError

REPO = Path(__file__).resolve().parents[1]


def tiny_model(folder: Path, units: int = 16, seed: int = 0) -> Path:
    """A small random model in the exported format: enough to generate, fast to run."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"embedding": rng.normal(0, 0.5, (259, units)).astype(np.float32)}
    for i in range(2):
        arrays[f"lstm{i}_kernel"] = rng.normal(0, 0.3, (units, 4 * units)).astype(np.float32)
        arrays[f"lstm{i}_recurrent"] = rng.normal(0, 0.3, (units, 4 * units)).astype(np.float32)
        arrays[f"lstm{i}_bias"] = np.zeros(4 * units, np.float32)
    arrays["dense_kernel"] = rng.normal(0, 0.3, (units, 259)).astype(np.float32)
    bias = np.zeros(259, np.float32)
    bias[2] = 2.0  # STEP_END likely, so pieces stay sparse like music
    arrays["dense_bias"] = bias
    np.savez(folder / "weights.npz", **arrays)
    info = {"format": "chiptune-forge-lstm-1", "encoding": "polyphony-1", "num_classes": 259,
            "hparams": {"batch_size": 4, "rnn_layer_sizes": [units, units], "dropout_keep_prob": 1.0,
                        "clip_norm": 5.0, "learning_rate": 0.001},
            "layers": [units, units], "embedding_dim": units, "training_steps": 0}
    (folder / "model.json").write_text(json.dumps(info))
    return folder


MANIFEST = """\
[project]
output_dir = "music"
model = "model"
preset = "{preset}"
formats = {formats}
sample_rate = 32000

[[track]]
name = "theme"
bars = 2
intro_bars = 1
tempo = {tempo}
seed = {seed}
candidates = 2
pick = {pick}

[[track]]
name = "given"
midi = "song.mid"
bars = 2
loop = {loop}
"""


def project(tmp_path: Path, **changes: object) -> Path:
    values = {"preset": "snes", "formats": '["ogg"]', "tempo": 120, "seed": 1, "pick": '"best"', "loop": "true"}
    values.update(changes)
    root = tmp_path / "game"
    root.mkdir(exist_ok=True)
    if not (root / "model").exists():
        tiny_model(root / "model")
    if not (root / "song.mid").exists():
        simple_song(root / "song.mid", bars=3)
    (root / "chiptune.toml").write_text(MANIFEST.format(**values))
    return root / "chiptune.toml"


def statuses(report) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {t.name: (t.status, tuple(t.stages)) for t in report.tracks}


def zero_bytes(folder: Path, start: int, stop: int) -> None:
    """Damage every cache file in a folder inside, keeping its length and zip structure's ends."""
    for npz in folder.glob("*.npz"):
        data = bytearray(npz.read_bytes())
        data[start:stop] = bytes(stop - start)
        npz.write_bytes(bytes(data))


def decoded(path: Path) -> np.ndarray:
    data, _ = sf.read(str(path), dtype="float32")
    return data


def test_incremental_stages(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    first = build(manifest)
    assert statuses(first) == {"theme": ("built", ("generate", "render", "export")),
                               "given": ("built", ("render", "export"))}, [t.error for t in first.tracks]
    music = manifest.parent / "music"
    assert (music / "theme.ogg").is_file() and (music / "given.ogg").is_file()
    assert not list(music.glob("*.partial")) and not list(music.glob(".*.partial"))

    assert statuses(build(manifest)) == {"theme": ("skipped", ()), "given": ("skipped", ())}

    project(tmp_path, preset="snes_dry")  # preset only: re-render, no generation
    assert statuses(build(manifest)) == {"theme": ("built", ("render", "export")),
                                         "given": ("built", ("render", "export"))}

    project(tmp_path, preset="snes_dry", tempo=100)  # tempo: the generated track re-renders
    report = build(manifest)
    assert statuses(report)["theme"] == ("built", ("render", "export"))
    assert statuses(report)["given"] == ("skipped", ())
    assert any("midi" in r for r in report.tracks[0].reasons)

    project(tmp_path, preset="snes_dry", tempo=100, formats='["ogg", "wav"]')  # export only
    assert statuses(build(manifest)) == {"theme": ("built", ("export",)), "given": ("built", ("export",))}
    assert (music / "theme.wav").is_file()

    project(tmp_path, preset="snes_dry", tempo=100, formats='["wav"]', pick=1)  # another candidate, no model run
    report = build(manifest)
    assert statuses(report)["theme"] == ("built", ("render", "export"))
    assert not (music / "theme.ogg").exists(), "a dropped format's old file is removed"

    project(tmp_path, preset="snes_dry", tempo=100, formats='["wav"]', pick=1, seed=2)  # new take
    assert statuses(build(manifest))["theme"] == ("built", ("generate", "render", "export"))


def test_lock_reproduces_without_cache(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    build(manifest)
    music = manifest.parent / "music"
    before = (music / "theme.ogg").read_bytes()
    lock = json.loads((manifest.parent / LOCK_NAME).read_text())
    entry = lock["tracks"]["theme"]
    assert {"candidate", "midi_sha256", "model_sha256", "inputs_sha256", "events"} <= set(entry)

    import shutil

    shutil.rmtree(manifest.parent / CACHE_DIR)
    (music / "theme.ogg").unlink()
    report = build(manifest)
    assert statuses(report)["theme"] == ("built", ("render", "export")), "the lock's take is rendered, not regenerated"
    assert (music / "theme.ogg").read_bytes() == before  # the same file, byte for byte
    assert json.loads((manifest.parent / LOCK_NAME).read_text())["tracks"]["theme"]["midi_sha256"] == \
        entry["midi_sha256"]

    said: list[str] = []
    report = build(manifest, regenerate=["theme", "given"], log=said.append)
    assert statuses(report)["theme"][1][0] == "generate"
    assert json.loads((manifest.parent / LOCK_NAME).read_text())["tracks"]["theme"]["midi_sha256"] == \
        entry["midi_sha256"], "generation is deterministic"
    assert "given: --regenerate does nothing for a track rendered from its midi file" in said
    assert "theme: the same model and seed make the same take again; change the track's seed for new music" in said


def test_same_gain_keeps_levels_and_every_file_under_the_ceiling(tmp_path: Path) -> None:
    from chiptune_forge.export import true_peak_db

    manifest = project(tmp_path, formats='["ogg", "wav"]', preset="snes_dry")
    text = manifest.read_text().replace("sample_rate = 32000", "sample_rate = 48000\nsame_gain = true\n"
                                        "loudness_lufs = -5.0\ntrue_peak_db = -1.0")
    manifest.write_text(text)  # a target far too loud for the ceiling: the headroom decides the gain
    report = build(manifest)
    assert {t.status for t in report.tracks} == {"built"}
    music = manifest.parent / "music"
    sidecars = {name: json.loads((music / f"{name}.json").read_text()) for name in ("theme", "given")}
    assert sidecars["theme"]["gain_db"] == sidecars["given"]["gain_db"]
    peaks = []
    for name, sidecar in sidecars.items():
        for fmt in ("ogg", "wav"):
            audio, rate = sf.read(str(music / f"{name}.{fmt}"), dtype="float32", always_2d=True)
            peaks.append(true_peak_db(audio, rate, sidecar["loop_start_frames"]))
    assert max(peaks) <= -1.0
    assert max(peaks) > -1.5  # and the loudest file comes close to it

    # The limiting track's formats change its codec headroom, so the shared gain moves for every track.
    manifest.write_text(manifest.read_text().replace('name = "theme"', 'name = "theme"\nformats = ["wav"]'))
    build(manifest)
    gains = {json.loads((music / f"{name}.json").read_text())["gain_db"] for name in ("theme", "given")}
    assert len(gains) == 1 and gains != {sidecars["theme"]["gain_db"]}
    assert build(manifest).changed == []


def test_the_lock_pins_takes_across_model_changes_and_preset_edits_never_load_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chiptune_forge.lstm

    manifest = project(tmp_path)
    build(manifest)
    lock_path = manifest.parent / LOCK_NAME
    locked = json.loads(lock_path.read_text())["tracks"]["theme"]
    loads: list[object] = []
    real_load = chiptune_forge.lstm.load_model
    monkeypatch.setattr(chiptune_forge.lstm, "load_model", lambda *a: loads.append(a) or real_load(*a))

    project(tmp_path, preset="snes_dry")
    assert statuses(build(manifest))["theme"] == ("built", ("render", "export"))
    assert loads == [], "a preset change re-renders without loading the model"

    tiny_model(manifest.parent / "model", seed=7)  # new weights
    said: list[str] = []
    report = build(manifest, log=said.append)
    assert statuses(report)["theme"] == ("skipped", ()) and loads == []
    assert any("locked take came from another model" in line for line in said)
    assert json.loads(lock_path.read_text())["tracks"]["theme"] == locked

    report = build(manifest, regenerate=["theme"])
    assert statuses(report)["theme"][1][0] == "generate" and len(loads) == 1
    assert json.loads(lock_path.read_text())["tracks"]["theme"]["model_sha256"] != locked["model_sha256"]


def test_check_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = project(tmp_path)
    assert main(["build", str(manifest), "--check"]) == 1
    assert "theme: out of date" in capsys.readouterr().out
    assert not (manifest.parent / "music").exists(), "--check builds nothing"
    assert main(["build", str(manifest), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {t["name"]: t["status"] for t in report["tracks"]} == {"theme": "built", "given": "built"}
    assert all(t["files"] for t in report["tracks"])
    assert main(["build", str(manifest), "--check"]) == 0
    assert capsys.readouterr().out.splitlines() == ["theme: up to date", "given: up to date"]
    import chiptune_forge

    assert chiptune_forge.build(manifest, check=True).changed == []
    project(tmp_path, loop="false")
    assert main(["build", str(manifest), "--check", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    given = next(t for t in report["tracks"] if t["name"] == "given")
    assert given["status"] == "outdated" and any("loop" in r for r in given["reasons"])
    assert main(["build", str(manifest), "--only", "nope"]) == 2
    assert main(["build", str(manifest.parent / "missing.toml")]) == 2
    assert main(["build", str(manifest), "--check=false", "--json=true"]) == 0


def test_second_build_is_refused_while_one_runs(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    cache = manifest.parent / CACHE_DIR
    cache.mkdir()
    with open(cache / "build.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(ChiptuneError, match="another build is running"):
            build(manifest)
        assert main(["build", str(manifest)]) == 3


def test_failed_export_keeps_previous_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = project(tmp_path)
    build(manifest)
    music = manifest.parent / "music"
    before = {p.name: p.read_bytes() for p in music.iterdir()}
    import chiptune_forge.export

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    # Worker processes are forked from this one, so they see the patched writer.
    monkeypatch.setattr(chiptune_forge.export, "export_track", broken)
    project(tmp_path, preset="snes_dry")
    report = build(manifest)
    assert {t.status for t in report.tracks} == {"failed"}
    assert all("disk full" in t.error for t in report.tracks)
    assert {p.name: p.read_bytes() for p in music.iterdir()} == before


def test_damaged_lock_state_and_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = project(tmp_path)
    root = manifest.parent
    build(manifest)
    lock_path = root / LOCK_NAME
    good_lock = lock_path.read_text()
    capsys.readouterr()

    # An unreadable lock stops the build (exit 2) instead of silently generating new takes.
    for text in ("garbage {", "[1, 2]"):
        lock_path.write_text(text)
        assert main(["build", str(manifest)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"chiptune-forge: error: {lock_path}: ") and "Traceback" not in err
        assert lock_path.read_text() == text, "the damaged lock is left for the user to restore"
    # So does one without its format version, or from a newer chiptune-forge.
    for version in (None, 99):
        lock = json.loads(good_lock)
        lock.pop("version") if version is None else lock.update(version=version)
        lock_path.write_text(json.dumps(lock))
        assert main(["build", str(manifest)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"chiptune-forge: error: {lock_path}: ") and "Traceback" not in err

    # A damaged take or entry fails its track only; the others build.
    for damage in ({"events": "AAA"}, {"generation": None}, {"inputs_sha256": 5}):
        damaged = json.loads(good_lock)
        damaged["tracks"]["theme"].update(damage)
        damaged["tracks"]["theme"] = {k: v for k, v in damaged["tracks"]["theme"].items() if v is not None}
        lock_path.write_text(json.dumps(damaged))
        (root / CACHE_DIR / "state.json").unlink(missing_ok=True)
        report = build(manifest, force=True)
        by_name = {t.name: t for t in report.tracks}
        assert by_name["theme"].status == "failed" and "--regenerate theme" in by_name["theme"].error, damage
        assert by_name["given"].status == "built"

    # A damaged state.json is only a cache: the build starts over.
    lock_path.write_text(good_lock)
    (root / CACHE_DIR / "state.json").write_text("[]")
    assert all(t.status == "built" for t in build(manifest).tracks)

    # A damaged audio cache is rendered again: cut short, or with bytes changed inside (when an export
    # needs it: here the asset is gone).
    for npz in (root / CACHE_DIR / "audio").glob("*.npz"):
        npz.write_bytes(npz.read_bytes()[:100])
    report = build(manifest)
    assert statuses(report)["theme"] == ("built", ("render", "export"))
    assert "render: audio cache missing or damaged" in {t.name: t for t in report.tracks}["theme"].reasons
    asset = root / "music" / "theme.ogg"
    good_asset = asset.read_bytes()
    zero_bytes(root / CACHE_DIR / "audio", 2000, 2100)
    asset.unlink()
    report = build(manifest)
    assert not report.failed, [t.error for t in report.failed]
    assert statuses(report)["theme"] == ("built", ("render", "export")) and asset.read_bytes() == good_asset

    # A damaged generation cache is made again by the model (the same take).
    zero_bytes(root / CACHE_DIR / "gen", 200, 260)
    lock_path.unlink()
    report = build(manifest)
    assert statuses(report)["theme"] == ("built", ("generate", "lock"))
    assert json.loads(lock_path.read_text())["tracks"]["theme"] == json.loads(good_lock)["tracks"]["theme"]

    # A deleted lock is written again from the cached takes, without generating.
    lock_path.unlink()
    assert statuses(build(manifest))["theme"] == ("built", ("lock",))
    assert json.loads(lock_path.read_text())["tracks"]["theme"] == json.loads(good_lock)["tracks"]["theme"]
    assert statuses(build(manifest))["theme"] == ("skipped", ())

    # With neither the lock nor the generation cache, the reason says so (no setting changed).
    lock_path.unlink()
    for npz in (root / CACHE_DIR / "gen").glob("*.npz"):
        npz.unlink()
    report = build(manifest)
    assert {t.name: t for t in report.tracks}["theme"].reasons == ["generation: no take locked or cached"]


def _build_killed_when(manifest: Path, moment) -> bool:
    """Run a build in a subprocess and SIGKILL its whole process group as soon as `moment()` is true;
    whether that moment came before the build ended."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "chiptune_forge", "build", str(manifest)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    caught = False
    while time.monotonic() < deadline and proc.poll() is None:
        if moment():
            caught = True
            break
        time.sleep(0.0005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    return caught


@pytest.mark.parametrize("moment", ["generating", "writing assets"])
def test_killed_build_leaves_only_complete_files(tmp_path: Path, moment: str) -> None:
    manifest = project(tmp_path, formats='["ogg", "wav"]')
    build(manifest)
    music = manifest.parent / "music"
    before = {p.name: p.read_bytes() for p in music.iterdir()}
    project(tmp_path, formats='["ogg", "wav"]', preset="snes_dungeon", seed=5)
    if moment == "generating":
        caught = _build_killed_when(manifest, lambda: any((manifest.parent / CACHE_DIR / "gen").glob("*")))
    else:
        caught = _build_killed_when(manifest, lambda: any(n.endswith(".partial") for n in os.listdir(music)))
    assert caught, f"the build ended before {moment}"
    after = {p.name: p.read_bytes() for p in music.iterdir() if not p.name.endswith(".partial")}
    report = build(manifest)
    assert {t.status for t in report.tracks} <= {"built", "skipped"}
    assert not [p for p in music.iterdir() if p.name.endswith(".partial")], "the next build cleans up"
    final = {p.name: p.read_bytes() for p in music.iterdir()}
    for name, data in after.items():  # every asset is the previous good file or the finished new one
        assert data in (before.get(name), final.get(name)), name
    assert build(manifest).changed == []


def test_example_game_plays_headless(tmp_path: Path) -> None:
    root = tmp_path / "game"
    root.mkdir()
    tiny_model(root / "model")
    names = ["title", "town", "dungeon", "battle", "victory"]
    tracks = "".join(f'[[track]]\nname = "{n}"\nbars = 1\nseed = {i}\ncandidates = 1\n'
                     f'loop = {str(n != "victory").lower()}\n' for i, n in enumerate(names))
    (root / "chiptune.toml").write_text(f'[project]\nmodel = "model"\nsample_rate = 44100\n{tracks}')
    report = build(root / "chiptune.toml")
    assert not report.failed, [t.error for t in report.failed]
    env = dict(os.environ, SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="disk",
               SDL_DISKAUDIOFILE=str(tmp_path / "audio.raw"), SDL_DISKAUDIODELAY="0")
    out = subprocess.run([sys.executable, str(REPO / "example_game" / "game.py"), "--demo", "--room-seconds", "0.3",
                          "--music", str(root / "music")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == ["room title", "room town", "room dungeon", "room battle",
                                                          "room victory"]
    assert lines[-1] == "bye"
    captured = np.frombuffer((tmp_path / "audio.raw").read_bytes(), dtype=np.int16)
    assert captured.size > 0 and np.abs(captured).max() > 0, "the music was actually played"


def test_track_problems_found_while_building_name_the_file(tmp_path: Path) -> None:
    import mido

    tiny_model(tmp_path / "model")
    simple_song(tmp_path / "song.mid", bars=3)
    empty = mido.MidiFile()
    empty.tracks.append(mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000)]))
    empty.save(tmp_path / "empty.mid")
    (tmp_path / "chiptune.toml").write_text('[project]\nmodel = "model"\nsample_rate = 32000\n\n'
                                            '[[track]]\nname = "primed"\nbars = 1\nprimer_midi = "song.mid"\n\n'
                                            '[[track]]\nname = "silent"\nmidi = "empty.mid"\nbars = 1\n')
    errors = {t.name: t.error for t in build(tmp_path / "chiptune.toml").tracks}
    assert errors["primed"].startswith(f"{tmp_path / 'song.mid'}: the primer is ")
    assert errors["primed"].endswith(", longer than the 1 bar (16 steps) to generate")
    assert errors["silent"] == (f"{tmp_path / 'chiptune.toml'}:12: track 'silent': midi: {tmp_path / 'empty.mid'}: "
                                "no notes to render")


def test_midi_files_with_data_bytes_over_127_build_with_a_warning_on_their_key(tmp_path: Path) -> None:
    """A track's own midi file and a primer file: both are used, and the build log says which key read them."""
    tiny_model(tmp_path / "model")
    with_velocity_over_127(simple_song(tmp_path / "loud.mid", bars=2))
    manifest = tmp_path / "chiptune.toml"
    manifest.write_text('[project]\nmodel = "model"\nsample_rate = 32000\n\n'
                        '[[track]]\nname = "loud"\nmidi = "loud.mid"\nloop = false\n\n'  # midi: line 7
                        '[[track]]\nname = "primed"\nbars = 4\nloop = false\nprimer_midi = "loud.mid"\n')  # 14
    said: list[str] = []
    report = build(manifest, log=said.append)
    assert [t.status for t in report.tracks] == ["built", "built"]
    flaw = f"warning: {tmp_path / 'loud.mid'}: data bytes above 127 (not valid MIDI) were read as 127"
    assert f"{manifest}:7: track 'loud': midi: {flaw}" in said
    assert f"{manifest}:14: track 'primed': primer_midi: {flaw}" in said


def test_a_given_midi_files_problems_are_put_on_their_manifest_keys(tmp_path: Path) -> None:
    """A file that is not MIDI, bars past its end and a transposition out of range are found before any
    rendering and reported on the line of the key that asked for them."""
    simple_song(tmp_path / "song.mid", bars=3)
    write_song(tmp_path / "high.mid", [[tempo(0, 120.0), time_signature(0, 4, 4)],
                                       notes_track([(60, 0, 16), (120, 16, 32)])])
    (tmp_path / "notes.txt").write_text("not music\n")
    manifest = tmp_path / "chiptune.toml"
    manifest.write_text('[project]\nsample_rate = 32000\n\n'
                        '[[track]]\nname = "text"\nmidi = "notes.txt"\n\n'  # midi: line 6
                        '[[track]]\nname = "long"\nmidi = "song.mid"\nbars = 4\n\n'  # bars: line 11
                        '[[track]]\nname = "jingle"\nmidi = "song.mid"\nloop = false\nbars = 9\n\n'  # line 17
                        '[[track]]\nname = "high"\nmidi = "high.mid"\ntranspose = 12\n\n'  # transpose: line 22
                        '[[track]]\nname = "intro"\nmidi = "song.mid"\nintro_bars = 3\n')  # intro_bars: line 27
    errors = {t.name: t.error for t in build(manifest).tracks}
    assert errors["text"] == (f"{manifest}:6: track 'text': midi: {tmp_path / 'notes.txt'}: not a MIDI file "
                              "(no MThd header)")
    assert errors["long"] == (f"{manifest}:11: track 'long': bars: loop of 0 intro + 4 body bars is longer than the "
                              "piece (3 bars) in song.mid")
    assert errors["jingle"] == (f"{manifest}:17: track 'jingle': bars: jingle of 9 bars: the piece has 3 bars "
                                "in song.mid")
    assert errors["high"] == f"{manifest}:22: track 'high': transpose: 12 moves note 120 of high.mid outside 0..127"
    assert errors["intro"] == (f"{manifest}:27: track 'intro': intro_bars: an intro of 3 bars leaves no body: the "
                               "piece has 3 bars in song.mid")
    assert not (tmp_path / "music").exists() or not any((tmp_path / "music").iterdir()), "nothing was rendered"


def test_a_removed_track_takes_its_assets_along(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = project(tmp_path)
    music = manifest.parent / "music"
    build(manifest)
    assert sorted(p.name for p in music.iterdir()) == ["given.json", "given.ogg", "theme.json", "theme.ogg"]
    manifest.write_text(manifest.read_text().replace('name = "given"', 'name = "song"'))
    capsys.readouterr()
    assert main(["build", str(manifest), "--check"]) == 1
    assert "given: out of date (removed from the manifest)" in capsys.readouterr().out
    assert main(["build", str(manifest)]) == 0
    assert "given: removed from the manifest; deleted given.ogg, given.json" in capsys.readouterr().out
    assert sorted(p.name for p in music.iterdir()) == ["song.json", "song.ogg", "theme.json", "theme.ogg"]
    assert set(json.loads((manifest.parent / LOCK_NAME).read_text())["tracks"]) == {"theme"}
    assert main(["build", str(manifest), "--check"]) == 0


def test_a_copied_project_never_touches_the_original_assets(tmp_path: Path) -> None:
    import shutil

    manifest = project(tmp_path)
    build(manifest)
    original = {p.name: p.read_bytes() for p in (manifest.parent / "music").iterdir()}
    copy = tmp_path / "copy"
    shutil.copytree(manifest.parent, copy)  # .chiptune/ included: its state names the original's files
    text = (copy / "chiptune.toml").read_text().replace('name = "given"', 'name = "song"')
    (copy / "chiptune.toml").write_text(text.replace('formats = ["ogg"]', 'formats = ["wav"]'))
    old_style = copy.with_name("old-style")
    shutil.copytree(copy, old_style)
    report = build(copy / "chiptune.toml")
    assert not report.failed, [t.error for t in report.failed]
    assert {p.name: p.read_bytes() for p in (manifest.parent / "music").iterdir()} == original
    # The state records paths inside the project, so the copy cleans up its own copies of the old assets.
    assert sorted(p.name for p in (copy / "music").iterdir()) == ["song.json", "song.wav", "theme.json", "theme.wav"]
    # A state written before that named absolute paths, here the original's: those files are never touched.
    state_file = old_style / ".chiptune" / "state.json"
    state = json.loads(state_file.read_text())
    for entry in state["tracks"].values():
        entry["files"] = [str(manifest.parent / f) for f in entry["files"]]
    state_file.write_text(json.dumps(state))
    assert not build(old_style / "chiptune.toml").failed
    assert {p.name: p.read_bytes() for p in (manifest.parent / "music").iterdir()} == original


def test_a_moved_project_finds_its_assets(tmp_path: Path) -> None:
    """Build state records asset paths relative to the project: after a move, a removed track's assets and
    a format's old files are still cleaned up."""
    manifest = project(tmp_path)
    assert not build(manifest).failed
    moved = tmp_path / "moved"
    manifest.parent.rename(moved)
    text = (moved / "chiptune.toml").read_text().replace('formats = ["ogg"]', 'formats = ["wav"]')
    (moved / "chiptune.toml").write_text(text.replace('name = "given"', 'name = "song"'))
    report = build(moved / "chiptune.toml")
    assert not report.failed, [t.error for t in report.failed]
    assert [t.files for t in report.tracks if t.status == "removed"] == [
        [str(moved / "music" / "given.ogg"), str(moved / "music" / "given.json")]]
    assert sorted(p.name for p in (moved / "music").iterdir()) == ["song.json", "song.wav", "theme.json", "theme.wav"]


def _write_then_sleep(path: str) -> None:
    Path(path).write_bytes(b"half an asset")
    time.sleep(30)


def test_an_interrupted_parallel_stage_stops_its_workers_and_removes_what_they_wrote(tmp_path: Path) -> None:
    """Ctrl-C while workers run: they are stopped, not waited for (waiting could hang on the pool's lock),
    and the temporary files they were writing do not stay in the game's music folder."""
    import threading

    from chiptune_forge.builder import Builder
    from chiptune_forge.manifest import load_manifest

    builder = Builder(load_manifest(project(tmp_path)), show_progress=False)
    music = builder.m.project.output_dir
    music.mkdir()
    jobs = {name: str(music / f".{name}.ogg.partial") for name in ("a", "b")}

    def interrupt_once_both_write() -> None:
        wait_until = time.monotonic() + 20
        while not all(Path(f).exists() for f in jobs.values()) and time.monotonic() < wait_until:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    started = time.monotonic()
    threading.Thread(target=interrupt_once_both_write, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        list(builder._map(_write_then_sleep, jobs, "export"))
    assert time.monotonic() - started < 15
    assert not list(music.iterdir())


def test_an_asset_damaged_on_disk_is_rebuilt_and_a_touched_one_is_not(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    build(manifest)
    asset = manifest.parent / "music" / "theme.ogg"
    good = asset.read_bytes()
    os.utime(asset, ns=(1, 1))  # a checkout or copy that only changed its time
    assert statuses(build(manifest))["theme"] == ("skipped", ())
    asset.write_bytes(good[:1000])  # truncated
    report = build(manifest, check=True)
    theme = next(t for t in report.tracks if t.name == "theme")
    assert theme.status == "outdated" and "output changed on disk" in theme.reasons
    assert statuses(build(manifest))["theme"] == ("built", ("export",))
    assert asset.read_bytes() == good


def test_a_renamed_track_takes_its_assets_along_without_build_state(tmp_path: Path) -> None:
    """A fresh clone has the lock and the assets but no .chiptune/; the lock and sidecars tell what was ours."""
    import shutil

    manifest = project(tmp_path)
    build(manifest)
    music = manifest.parent / "music"
    (music / "mine.ogg").write_bytes(b"the user's own file")
    locked = json.loads((manifest.parent / LOCK_NAME).read_text())["tracks"]
    shutil.rmtree(manifest.parent / CACHE_DIR)
    manifest.write_text(manifest.read_text().replace('name = "theme"', 'name = "opening"'))
    checked = statuses(build(manifest, check=True))
    assert checked["opening"][0] == "outdated" and checked["theme"][0] == "outdated"
    report = build(manifest)
    assert statuses(report)["theme"][0] == "removed"
    assert sorted(p.name for p in music.iterdir()) == ["given.json", "given.ogg", "mine.ogg", "opening.json",
                                                       "opening.ogg"]
    lock = json.loads((manifest.parent / LOCK_NAME).read_text())["tracks"]
    assert "theme" not in lock
    # The name is not a generation setting: the renamed track keeps the locked take, without the model.
    assert "generate" not in statuses(report)["opening"][1]
    assert lock["opening"]["events"] == locked["theme"]["events"]


def test_the_reason_names_only_what_changed() -> None:
    from chiptune_forge.builder import changed_inputs

    recorded = json.loads(json.dumps({"primer_melody": (60, -2, 64), "seed": 1}))  # as the state file keeps it
    assert changed_inputs(recorded, {"primer_melody": (60, -2, 64), "seed": 2}) == ["seed"]


def test_a_preset_edited_during_a_build_is_not_mixed_up(tmp_path: Path) -> None:
    """A build renders the preset it planned with; an edit saved meanwhile is the next build's change,
    not audio filed under the earlier settings."""
    from chiptune_forge.builder import Builder
    from chiptune_forge.manifest import load_manifest

    preset_text = (REPO / "presets" / "snes.toml").read_text()

    def with_echo(ms: int) -> str:
        assert "delay_ms = 80" in preset_text
        return preset_text.replace("delay_ms = 80", f"delay_ms = {ms}")

    manifest = project(tmp_path, preset="mine.toml")
    root = manifest.parent
    (root / "mine.toml").write_text(with_echo(128))

    class EditedMeanwhile(Builder):
        def _take_and_midi(self, *args):  # after planning, before rendering
            (root / "mine.toml").write_text(with_echo(240))
            return super()._take_and_midi(*args)

    assert not EditedMeanwhile(load_manifest(manifest), show_progress=False).run().failed
    clean = tmp_path / "clean"
    clean.mkdir()
    clean_manifest = project(clean, preset="mine.toml")
    (clean_manifest.parent / "mine.toml").write_text(with_echo(128))
    assert not build(clean_manifest).failed
    for name in ("given.ogg", "theme.ogg"):
        assert (root / "music" / name).read_bytes() == (clean_manifest.parent / "music" / name).read_bytes()
    assert statuses(build(manifest))["given"] == ("built", ("render", "export")), "the 240 ms edit renders next"


def test_a_second_manifest_in_the_folder_keeps_to_its_own_tracks(tmp_path: Path) -> None:
    """experiment.toml beside chiptune.toml has its own lock and build state: the tracks it lacks are not
    'removed from the manifest', and sharing the output folder deletes nothing of the other's."""
    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    music_before = {p.name: p.read_bytes() for p in (root / "music").iterdir()}
    lock_before = (root / LOCK_NAME).read_text()
    text = manifest.read_text()
    experiment = root / "experiment.toml"
    experiment.write_text(text[:text.index('[[track]]\nname = "given"')].replace('"music"', '"trial"'))
    report = build(experiment)
    assert not report.failed and [t.name for t in report.tracks] == ["theme"]
    assert (root / LOCK_NAME).read_text() == lock_before
    assert set(json.loads((root / "experiment.lock").read_text())["tracks"]) == {"theme"}
    assert {p.name: p.read_bytes() for p in (root / "music").iterdir()} == music_before
    assert {t.status for t in build(manifest).tracks} == {"skipped"}

    # A track moved into the other manifest, both writing to music/: its new files are the other's now.
    given = text[text.index('[[track]]\nname = "given"'):]
    manifest.write_text(text.replace(given, ""))
    moved = root / "moved.toml"
    moved.write_text(text[:text.index("[[track]]")] + given)
    assert not build(moved).failed
    written = {p.name: p.read_bytes() for p in (root / "music").iterdir() if p.stem == "given"}
    report = build(manifest)
    assert [t.name for t in report.tracks if t.status == "removed"] == ["given"]
    assert {p.name: p.read_bytes() for p in (root / "music").iterdir() if p.stem == "given"} == written
    assert {t.status for t in build(moved).tracks} == {"skipped"}


def test_a_format_switch_without_build_state_replaces_the_old_files(tmp_path: Path) -> None:
    """In a fresh clone (no .chiptune/) the sidecar tells which files the earlier export wrote; a lock
    write that was killed leaves a temporary file beside the manifest, which the next build removes."""
    import shutil

    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    shutil.rmtree(root / CACHE_DIR)
    (root / f".{LOCK_NAME}.12345.partial").write_text("{")
    manifest.write_text(manifest.read_text().replace('formats = ["ogg"]', 'formats = ["wav"]'))
    assert not build(manifest).failed
    assert sorted(p.name for p in (root / "music").iterdir()) == ["given.json", "given.wav", "theme.json",
                                                                  "theme.wav"]
    assert not list(root.glob("*.partial")) and not list(root.glob(".*.partial"))


def test_a_new_output_folder_takes_the_assets_along(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    (root / "music" / "notes.txt").write_text("the user's own file")
    manifest.write_text(manifest.read_text().replace('output_dir = "music"', 'output_dir = "assets/audio"'))
    assert not build(manifest).failed
    assert sorted(p.name for p in (root / "assets" / "audio").iterdir()) == ["given.json", "given.ogg",
                                                                             "theme.json", "theme.ogg"]
    assert sorted(p.name for p in (root / "music").iterdir()) == ["notes.txt"]


def test_build_options_that_would_do_nothing_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = project(tmp_path)
    assert main(["build", str(manifest), "--only", "given", "--regenerate", "theme"]) == 2
    err = capsys.readouterr().err
    assert "--regenerate theme: not among the --only tracks" in err and err.count("\n") == 1
    monkeypatch.chdir(tmp_path)  # no chiptune.toml here; the folder given after --only is read as a track
    assert main(["build", "--only", "theme", "game"]) == 2
    err = capsys.readouterr().err
    assert "'game' was read as a track name" in err and "build game --only" in err


def test_a_take_edited_in_the_lock_is_built_as_locked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A lock changed by hand or by a merge: the build notices, says so, and builds what the lock holds."""
    import base64
    import shutil

    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    lock_path = root / LOCK_NAME
    lock = json.loads(lock_path.read_text())
    events = np.frombuffer(base64.b64decode(lock["tracks"]["theme"]["events"]), dtype="<i2")
    lock["tracks"]["theme"]["events"] = base64.b64encode(np.roll(events, 7).astype("<i2").tobytes()).decode()
    lock_path.write_text(json.dumps(lock))
    before = (root / "music" / "theme.ogg").read_bytes()
    capsys.readouterr()
    assert main(["build", str(manifest)]) == 0
    captured = capsys.readouterr()
    assert "theme: built [render, export]" in captured.out and "the locked take changed" in captured.out
    assert "theme: warning: the take locked for it does not match the MIDI hash" in captured.err
    edited = (root / "music" / "theme.ogg").read_bytes()
    assert edited != before
    assert statuses(build(manifest))["theme"] == ("skipped", ())
    shutil.rmtree(root / CACHE_DIR)
    assert not build(manifest).failed
    assert (root / "music" / "theme.ogg").read_bytes() == edited


def test_an_older_shared_state_never_deletes_another_manifests_files(tmp_path: Path) -> None:
    """Before each manifest had its own state, .chiptune/state.json was shared and recorded absolute paths:
    a track of another manifest found there is dropped without touching its files in their own folder."""
    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    (root / "sfx").mkdir()
    jingle = root / "sfx" / "jingle.ogg"
    jingle.write_bytes(b"another manifest's asset")
    state_file = root / CACHE_DIR / "state.json"
    state = json.loads(state_file.read_text())
    state["tracks"]["jingle"] = {"files": [str(jingle)], "render_key": "0" * 32}
    state_file.write_text(json.dumps(state))
    report = build(manifest)
    assert [t.name for t in report.tracks if t.status == "removed"] == ["jingle"]
    assert jingle.read_bytes() == b"another manifest's asset"


def test_a_manifest_with_its_own_name_takes_the_lock_it_had(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """game.toml built by an earlier version kept its takes in chiptune.lock: the next build renames it to
    game.lock, keeping the takes, so a chiptune.toml added later starts its own."""
    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    locked = json.loads((root / LOCK_NAME).read_text())
    game = manifest.rename(root / "game.toml")
    shutil.rmtree(root / CACHE_DIR / "gen")  # only the lock holds the take now
    report = build(game)
    assert not report.failed and "generate" not in statuses(report)["theme"][1]
    assert not (root / LOCK_NAME).exists() and json.loads((root / "game.lock").read_text()) == locked
    assert "game.toml: its lock is now game.lock (it was chiptune.lock, the lock of a manifest that is gone)" in \
        capsys.readouterr().err
    music = {p.name: p.read_bytes() for p in (root / "music").iterdir()}
    (root / "chiptune.toml").write_text('[project]\noutput_dir = "other"\nmodel = "model"\n\n'
                                        '[[track]]\nname = "menu"\nbars = 1\ncandidates = 1\n')
    assert not build(root / "chiptune.toml").failed
    assert json.loads((root / "game.lock").read_text()) == locked
    assert {p.name: p.read_bytes() for p in (root / "music").iterdir()} == music
    assert {t.status for t in build(game).tracks} == {"skipped"}


def test_a_renamed_track_not_built_yet_keeps_its_take(tmp_path: Path) -> None:
    """Renamed, then a build of other tracks only: nothing is removed, and the next full build moves the
    take to the new name."""
    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    locked = json.loads((root / LOCK_NAME).read_text())["tracks"]["theme"]
    shutil.rmtree(root / CACHE_DIR / "gen")
    manifest.write_text(manifest.read_text().replace('name = "theme"', 'name = "opening"'))
    assert not build(manifest, only=["given"]).failed  # a partial build removes nothing
    assert json.loads((root / LOCK_NAME).read_text())["tracks"] == {"theme": locked}
    assert (root / "music" / "theme.ogg").is_file()
    report = build(manifest)
    assert not report.failed and "generate" not in statuses(report)["opening"][1]
    assert json.loads((root / LOCK_NAME).read_text())["tracks"]["opening"]["events"] == locked["events"]


def test_regenerate_replaces_an_incomplete_lock_entry(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    assert not build(manifest).failed
    lock_path = manifest.parent / LOCK_NAME
    lock = json.loads(lock_path.read_text())
    del lock["tracks"]["theme"]["model_sha256"]
    lock_path.write_text(json.dumps(lock))
    assert build(manifest).failed
    report = build(manifest, regenerate=["theme"])
    assert not report.failed and "model_sha256" in json.loads(lock_path.read_text())["tracks"]["theme"]


def test_odd_state_and_lock_contents_are_errors_or_rebuilt_never_tracebacks(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import base64

    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    lock_path, state_path = root / LOCK_NAME, root / CACHE_DIR / "state.json"
    good_lock, good_state = lock_path.read_text(), json.loads(state_path.read_text())
    (root / "victim.txt").write_text("mine")
    # State is a cache: odd entries are forgotten (and rebuilt); recorded paths never reach past the assets.
    (root / "data").mkdir()
    (root / "data" / "levels.json").write_text("{}")
    (root / "music" / "credits.txt").write_text("mine")
    for odd in (5, {"files": "song"}, {"files": [5]}, {"file_stamps": [1]}, {"render_key": [1]},
                {"audio_meta": {"x": 1}}, {"audio_meta": {"loudness_lufs": -20, "headroom_db": [1]}},
                {"files": ["../victim.txt", "chiptune.lock", "music/../song.mid", "chiptune.toml", "data/levels.json",
                           "music/credits.txt"]}):
        state = json.loads(json.dumps(good_state))
        state["tracks"]["gone"] = odd
        state["tracks"]["theme"] = odd
        state_path.write_text(json.dumps(state))
        report = build(manifest)
        assert not report.failed, (odd, [t.error for t in report.failed])
        assert all((root / f).is_file() for f in ("victim.txt", "chiptune.lock", "song.mid", "chiptune.toml",
                                                  "data/levels.json", "music/credits.txt"))
    assert (tmp_path / "victim.txt").exists() is False and (root / "victim.txt").read_text() == "mine"
    # A lock without its tracks is not a lock; a take edited into events that are not music fails its track.
    lock_path.write_text('{"version": 2}')
    assert main(["build", str(manifest)]) == 2
    assert "not a chiptune-forge lock" in capsys.readouterr().err
    lock = json.loads(good_lock)
    lock["tracks"]["theme"]["events"] = base64.b64encode(np.array([9999], "<i2").tobytes()).decode()
    lock_path.write_text(json.dumps(lock))
    report = build(manifest, force=True)
    theme = next(t for t in report.tracks if t.name == "theme")
    assert theme.status == "failed" and "--regenerate theme" in theme.error


def test_a_track_that_another_manifest_in_the_folder_has_keeps_its_files(tmp_path: Path) -> None:
    """A chiptune.toml added beside a manifest that an earlier version built (its takes and state in the
    shared chiptune.lock and state.json): the other's tracks are not this manifest's, and their assets stay."""
    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    manifest.rename(root / "other.toml")
    music = {p.name: p.read_bytes() for p in (root / "music").iterdir()}
    (root / "chiptune.toml").write_text('[project]\noutput_dir = "music"\nmodel = "model"\n\n'
                                        '[[track]]\nname = "menu"\nbars = 1\ncandidates = 1\n')
    report = build(root / "chiptune.toml")
    assert not report.failed
    assert {p.name: p.read_bytes() for p in (root / "music").iterdir() if p.stem != "menu"} == music
    assert {t.status for t in build(root / "chiptune.toml").tracks} == {"skipped"}


@pytest.mark.parametrize("selections", [[None], [["theme"], ["boss"]]])
def test_two_swapped_track_names_keep_their_takes(tmp_path: Path, selections: list) -> None:
    """Built together, or one with --only and then the other."""
    manifest = project(tmp_path)
    text = manifest.read_text()
    boss = text[text.index('[[track]]\nname = "theme"'):text.index('[[track]]\nname = "given"')]
    manifest.write_text(text + "\n" + boss.replace('"theme"', '"boss"').replace("seed = 1", "seed = 5"))
    assert not build(manifest).failed
    root = manifest.parent
    before = json.loads((root / LOCK_NAME).read_text())["tracks"]
    assert before["theme"]["events"] != before["boss"]["events"]
    shutil.rmtree(root / CACHE_DIR / "gen")  # only the lock holds the takes
    swapped = manifest.read_text().replace('name = "theme"', 'name = "@"').replace('name = "boss"', 'name = "theme"')
    manifest.write_text(swapped.replace('name = "@"', 'name = "boss"'))
    for only in selections:
        report = build(manifest, only=only)
        assert not report.failed and not any("generate" in t.stages for t in report.tracks)
        assert not [t for t in report.tracks if t.status == "removed"]
    after = json.loads((root / LOCK_NAME).read_text())["tracks"]
    assert (after["theme"]["events"], after["boss"]["events"]) == (before["boss"]["events"],
                                                                 before["theme"]["events"])


def test_a_renamed_manifest_in_a_fresh_clone_still_knows_its_files(tmp_path: Path) -> None:
    """Sidecars name the manifest that wrote them; one naming a manifest that is gone (renamed) is ours."""
    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    game = manifest.rename(root / "game.toml")
    assert not build(game).failed
    shutil.rmtree(root / CACHE_DIR)
    game.write_text(game.read_text().replace('formats = ["ogg"]', 'formats = ["wav"]'))
    assert not build(game).failed
    assert sorted(p.name for p in (root / "music").iterdir()) == ["given.json", "given.wav", "theme.json",
                                                                  "theme.wav"]


def test_removal_next_to_another_manifest_and_odd_sidecars(tmp_path: Path) -> None:
    """A removed track's files go even when another manifest (with its own state, other folder) has a track
    of that name; a sidecar with an odd 'manifest' field is no crash."""
    manifest = project(tmp_path)
    root = manifest.parent
    (root / "other.toml").write_text('[project]\noutput_dir = "sfx"\nmodel = "model"\n\n'
                                     '[[track]]\nname = "given"\nmidi = "song.mid"\nbars = 2\n')
    assert not build(manifest).failed and not build(root / "other.toml").failed
    sfx = {p.name: p.read_bytes() for p in (root / "sfx").iterdir()}
    sidecar = root / "music" / "theme.json"
    sidecar.write_text(sidecar.read_text().replace('"manifest": "chiptune.toml"', '"manifest": ["x"]'))
    text = manifest.read_text()
    manifest.write_text(text[:text.index('[[track]]\nname = "given"')])
    report = build(manifest)
    assert not report.failed and [t.name for t in report.tracks if t.status == "removed"] == ["given"]
    assert sorted(p.name for p in (root / "music").iterdir()) == ["theme.json", "theme.ogg"]
    assert {p.name: p.read_bytes() for p in (root / "sfx").iterdir()} == sfx


def test_a_rename_prefers_the_take_of_a_track_that_is_gone(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    root = manifest.parent
    text = manifest.read_text()
    theme = text[text.index('[[track]]\nname = "theme"'):text.index('[[track]]\nname = "given"')]
    assert not build(manifest).failed
    tiny_model(root / "model", seed=1)  # a new model: a new track with the same settings gets another take
    manifest.write_text(text + "\n" + theme.replace('"theme"', '"zulu"'))
    assert not build(manifest).failed
    locked = json.loads((root / LOCK_NAME).read_text())["tracks"]
    assert locked["theme"]["events"] != locked["zulu"]["events"]
    renamed = manifest.read_text().replace('name = "zulu"', 'name = "finale"')
    manifest.write_text(renamed.replace("seed = 1\ncandidates = 2\npick", "seed = 5\ncandidates = 2\npick", 1))
    assert not build(manifest).failed
    after = json.loads((root / LOCK_NAME).read_text())["tracks"]
    assert after["finale"]["events"] == locked["zulu"]["events"]


@pytest.mark.parametrize("folder", ["music", "sfx"])
def test_a_track_moved_to_another_manifest(tmp_path: Path, folder: str) -> None:
    """Into another folder: its old files go at once. Into the same folder: they are left for the other
    manifest's build to replace (it has no build state yet), and end up as its files."""
    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    text = manifest.read_text()
    given = text[text.index('[[track]]\nname = "given"'):]
    manifest.write_text(text.replace(given, ""))
    other = root / "other.toml"
    other.write_text(text[:text.index("[[track]]")].replace('"music"', f'"{folder}"') + given)
    report = build(manifest)
    removed = [t.name for t in report.tracks if t.status == "removed"]
    assert not report.failed and removed == ([] if folder == "music" else ["given"])
    assert (root / "music" / "given.ogg").is_file() == (folder == "music")
    assert not build(other).failed
    later = build(manifest)  # now the other's: forgotten here, its files left alone
    assert [(t.name, t.files) for t in later.tracks if t.status == "removed"] == (
        [("given", [])] if folder == "music" else [])
    assert {t.status for t in build(manifest).tracks} == {"skipped"}
    assert sorted(p.name for p in (root / folder).iterdir() if p.stem == "given") == ["given.json", "given.ogg"]
    assert sorted(p.name for p in (root / "music").iterdir() if p.stem != "given") == ["theme.json", "theme.ogg"]


def test_a_manifest_renamed_twice_keeps_its_takes(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    assert not build(manifest).failed
    root = manifest.parent
    locked = json.loads((root / LOCK_NAME).read_text())
    tiny_model(root / "model", seed=1)  # a new model: only the lock can give the same takes
    current = manifest
    for name in ("soundtrack.toml", "game.toml", "chiptune.toml"):
        current = current.rename(root / name)
        report = build(current)
        assert not report.failed and not any("generate" in t.stages for t in report.tracks), name
        assert sorted(p.name for p in root.glob("*.lock")) == [f"{current.stem}.lock"]
        assert json.loads((root / f"{current.stem}.lock").read_text())["tracks"] == locked["tracks"]


def test_a_file_the_build_did_not_write_is_never_overwritten(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    root = manifest.parent
    (root / "music").mkdir()
    (root / "music" / "theme.json").write_text('{"my": "level data"}')
    report = build(manifest)
    theme = next(t for t in report.tracks if t.name == "theme")
    assert theme.status == "failed" and "theme.json: exists and is not a sidecar chiptune-forge wrote for track " \
        "'theme'" in theme.error
    assert (root / "music" / "theme.json").read_text() == '{"my": "level data"}'
    assert not (root / "music" / "theme.ogg").exists() and (root / "music" / "given.ogg").is_file()


def test_other_tools_lock_files_are_never_taken_for_ours(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    root = manifest.parent
    for name in ("uv.lock", "poetry.lock", "yarn.lock"):
        (root / name).write_text('version = 1\n[[package]]\nname = "x"\n')
    assert not build(manifest).failed
    assert main(["build", str(manifest), "--check"]) == 0
    for name in ("uv.lock", "poetry.lock", "yarn.lock"):
        assert (root / name).read_text() == 'version = 1\n[[package]]\nname = "x"\n'


def test_a_track_whose_render_clips_gets_a_warning(tmp_path: Path) -> None:
    manifest = project(tmp_path, preset="loud.toml")
    (manifest.parent / "loud.toml").write_text("".join(f"[roles.{role}]\nvolume = 1.0\n"
                                                       for role in ("lead", "harmony", "bass", "drums")))
    said: list[str] = []
    report = build(manifest, only=["given"], log=said.append)
    assert statuses(report)["given"][0] == "built"
    assert any(line.startswith("given: warning: ") and "at its 16-bit limit" in line
               and line.endswith(f"in {manifest.parent / 'loud.toml'}") for line in said), said


def test_two_manifests_with_one_track_name_in_one_folder_fail_that_track(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    root = manifest.parent
    text = manifest.read_text()
    given = text[text.index('[[track]]\nname = "given"'):]
    (root / "extra.toml").write_text(text[:text.index("[[track]]")] + given)
    for path, other in ((manifest, "extra.toml"), (root / "extra.toml", "chiptune.toml")):
        report = build(path, only=None)
        failed = {t.name: t.error for t in report.tracks if t.status == "failed"}
        assert list(failed) == ["given"], failed
        assert failed["given"] == (f"{other} also has a track 'given' exporting to {(root / 'music').resolve()}: "
                                   "the two would overwrite each other's files; rename one of the tracks or give "
                                   "one manifest another output_dir")
    assert not (root / "music" / "given.ogg").exists() and (root / "music" / "theme.ogg").is_file()
    (root / "extra.toml").write_text((root / "extra.toml").read_text().replace('"music"', '"sfx"'))
    assert not build(manifest).failed and not build(root / "extra.toml").failed
