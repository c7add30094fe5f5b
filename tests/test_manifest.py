"""Manifest validation: every problem reported at once, each with file, line and key; nothing built."""

from __future__ import annotations

from pathlib import Path

import pytest
from midi_factory import simple_song

from chiptune_forge.cli import main
from chiptune_forge.errors import ChiptuneError
from chiptune_forge.manifest import STARTER, ManifestError, load_manifest


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "chiptune.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return info.value.problems


def test_starter_manifest_is_valid(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, STARTER))
    assert [t.name for t in m.tracks] == ["title", "victory"]
    assert m.project.output_dir == (tmp_path / "music").resolve()
    assert m.tracks[1].loop is False
    assert m.tracks[0].primer_pitches == (60, 64, 67)


def test_every_problem_listed_with_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, """\
[project]
output_dir = "music"
formtas = ["ogg"]
sample_rate = 22050

[[track]]
name = "title"
bars = "eight"
tempo = 120

[[track]]
name = "title"
temprature = 0.9
pick = 7
candidates = 2

[[track]]
bars = 4
sample_rate = 48000
""")
    problems = problems_of(path)
    text = "\n".join(problems)
    assert f"{path}:3: [project] unknown key 'formtas' (did you mean 'formats'?)" in problems
    assert f"{path}:4: [project] sample_rate: 22050 is not one of 32000, 44100, 48000" in problems
    assert f"{path}:8: track 'title': bars: expected a whole number of bars, got 'eight'" in problems
    assert f"{path}:13: track 'title': unknown key 'temprature' (did you mean 'temperature'?)" in problems
    assert f"{path}:14: track 'title': pick: index 7 is outside 0..1 (candidates = 2)" in problems
    assert f"{path}:11: track 'title': name: duplicate of the track at line 6" in problems
    assert f"{path}:17: track #3: name: missing" in text
    assert f"{path}:19: track #3: sample_rate is a [project] setting; move it there" in problems
    assert len(problems) == 8


def test_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[project]\noutput_dir = \"music\n")
    problems = problems_of(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:2:") and "TOML syntax error" in problems[0]


def test_files_presets_and_paths(tmp_path: Path) -> None:
    simple_song(tmp_path / "theme.mid")
    path = write(tmp_path, """\
[project]
output_dir = "../outside"
preset = "snes_overwrld"
model = "no/such/model"

[[track]]
name = "a"
midi = "missing.mid"

[[track]]
name = "b"
midi = "theme.mid"
seed = 3

[[track]]
name = "c d"
primer_pitches = [60, 200]
primer_melody = [60]
""")
    text = "\n".join(problems_of(path))
    assert ":2: [project] output_dir: '../outside' leaves the project folder" in text
    assert ":3: [project] preset:" in text and "snes_overworld" in text
    assert ":4: [project] model: 'no/such/model' not found" in text
    assert ":8: track 'a': midi: file not found: missing.mid" in text
    assert ":13: track 'b': seed: has no effect on a track rendered from 'midi'" in text
    assert ":16: track 'c d': name: use letters" in text
    assert ":18: track 'c d': primer_melody: give only one primer" in text
    assert ":17: track 'c d': primer_pitches: 200 is not a pitch in 0..127" in text
    lines = [int(p.split(":")[1]) for p in text.splitlines()]
    assert lines == sorted(lines), "problems come in file order"


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ChiptuneError, match="manifest not found"):
        load_manifest(tmp_path / "nope.toml")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'game'\n")
    with pytest.raises(ChiptuneError, match=r"chiptune\.toml: manifest not found \(create one with"):
        load_manifest(tmp_path)
    (tmp_path / "game.toml").write_text("[project]\n[[track]]\nname = 'a'\n")
    with pytest.raises(ChiptuneError, match=r"chiptune\.toml: manifest not found; the folder has game\.toml: give its"):
        load_manifest(tmp_path)


def test_keys_outside_any_table_and_format_case(tmp_path: Path) -> None:
    path = write(tmp_path, 'seed = 3\noutput_dir = "m"\nvolum = 3\nformats = ["ogg"]\n[project]\nformats = ["WAV"]\n'
                           '[[track]]\nname = "x"\n')
    problems = problems_of(path)
    assert f"{path}:1: seed: a key outside any table (did you mean to put it under a [[track]]?)" in problems
    assert f"{path}:2: output_dir: a key outside any table (did you mean to put it under [project]?)" in problems
    assert f"{path}:3: volum: a key outside any table" in problems
    assert not any("unknown table" in p for p in problems)
    assert f"{path}:4: formats: a key outside any table (did you mean to put it under [project]?)" in problems
    assert f"{path}:6: [project] formats: 'WAV' is not one of ogg, wav (did you mean 'wav'?)" in problems


def test_a_table_made_by_its_subtables_is_located_at_the_first_of_them(tmp_path: Path) -> None:
    path = write(tmp_path, '[project]\noutput_dir = "music"\n\n[tracks.boss]\nmidi = "boss.mid"\n')
    assert f"{path}:4: unknown table [tracks] (did you mean 'track'?)" in problems_of(path)


def test_cli_lists_every_problem_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[project]\nbogus = 1\n[[track]]\nname = \"x\"\nbars = 0\n")
    assert main(["build", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert all(line.startswith(f"chiptune-forge: error: {path}:") for line in err)
    assert not (tmp_path / "music").exists() and not (tmp_path / ".chiptune").exists()


def test_build_json_reports_manifest_problems_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    path = write(tmp_path, "[project]\nbogus = 1\n[[track]]\nname = \"x\"\nbars = 0\n")
    assert main(["build", str(path), "--json"]) == 2
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["ok"] is False and report["manifest"] == str(path) and len(report["errors"]) == 2
    assert all(e.startswith(f"{path}:") for e in report["errors"]) and err.count("\n") == 2
    assert (report["tracks"], report["seconds"]) == ([], 0.0), "the same fields as a build's report"
    assert main(["build", str(path), "--json", "--only", "x", "--regenerate", "y"]) == 2
    assert "not among the --only tracks" in json.loads(capsys.readouterr().out)["errors"][0]
    path.write_text('[project]\nmodel = "default"\n[[track]]\nname = "x"\nbars = 1\n')
    (tmp_path / ".chiptune").write_text("a file where the build keeps its cache")
    assert main(["build", str(tmp_path), "--json"]) == 3
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["manifest"] == str(path.resolve()) and report["ok"] is False
    assert report["errors"][0].startswith(str(tmp_path / ".chiptune")) and err.startswith("chiptune-forge: error: ")


def test_init_writes_starter_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path)]) == 0
    assert (tmp_path / "chiptune.toml").read_text() == STARTER
    assert main(["init", str(tmp_path)]) == 2, "a bad request, like every other usage error"
    assert "already exists" in capsys.readouterr().err


def test_a_model_folder_without_a_model_and_a_loudness_out_of_range(tmp_path: Path) -> None:
    (tmp_path / "empty_model").mkdir()
    path = write(tmp_path, '[project]\nmodel = "empty_model"\nloudness_lufs = 5\n\n[[track]]\nname = "a"\n')
    problems = problems_of(path)
    assert len(problems) == 2
    assert ":2: [project] model:" in problems[0] and "not a model folder" in problems[0]
    assert ":3: [project] loudness_lufs: 5 LUFS is out of range" in problems[1]
    assert not (tmp_path / ".chiptune").exists(), "nothing is written"
    (tmp_path / "empty_model" / "model.json").write_text("{}")
    assert "has no weights.npz" in problems_of(path)[0]


def test_a_midi_tracks_body_runs_to_its_last_bar_line_unless_bars_is_given(tmp_path: Path) -> None:
    from midi_factory import simple_song

    simple_song(tmp_path / "song.mid", bars=3)
    path = write(tmp_path, '[[track]]\nname = "given"\nmidi = "song.mid"\n\n[[track]]\nname = "made"\n'
                           '\n[[track]]\nname = "cut"\nmidi = "song.mid"\nbars = 2\n')
    assert [t.bars for t in load_manifest(path).tracks] == [None, 8, 2]


def test_limits_conflicts_and_clashing_file_names(tmp_path: Path) -> None:
    (tmp_path / "music").write_text("not a folder")
    path = write(tmp_path, """\
[project]
true_peak_db = -80
split = true

[[track]]
name = "a"
bars = 100000
candidates = 1000000
temperature = inf

[[track]]
name = "jingle"
loop = false
intro_bars = 1

[[track]]
name = "A"

[[track]]
name = "a_loop"

[[track]]
name = ".hidden"
""")
    expected = [
        f"1: [project] output_dir: {(tmp_path / 'music').resolve()} is a file, not a folder",
        "2: [project] true_peak_db: -80 dBTP is out of range (use -20 to 0, e.g. -1)",
        "7: track 'a': bars: must be within 1..512, got 100000",
        "8: track 'a': candidates: must be within 1..256, got 1000000",
        "9: track 'a': temperature: must be a finite number greater than 0, got inf",
        "14: track 'jingle': intro_bars: a jingle (loop = false) has no intro; remove one of them",
        "16: track 'A': name: duplicate of the track at line 5 (names differ only in case, which is the same file "
        "on Windows and macOS)",
        "19: track 'a_loop': name: the same file as track 'a''s split clip (split = true)",
        "23: track '.hidden': name: use letters, digits, '_', '-' and '.' only, not starting with '.' "
        "(it becomes a file name)",
    ]
    assert problems_of(path) == [f"{path}:{line}" for line in expected]


def test_output_dir_cannot_be_the_build_cache(tmp_path: Path) -> None:
    path = write(tmp_path, '[project]\noutput_dir = ".chiptune"\n\n[[track]]\nname = "a"\n')
    assert problems_of(path) == [f"{path}:2: [project] output_dir: .chiptune is the build cache's folder; "
                                 "choose another"]


def test_init_creates_a_new_project_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "new game")]) == 0  # a name without .toml is a folder, as "mygame/"
    assert (tmp_path / "new game" / "chiptune.toml").read_text() == STARTER
    out = capsys.readouterr().out
    assert f"chiptune-forge build '{tmp_path / 'new game' / 'chiptune.toml'}'" in out  # pastes as it is
    assert main(["init", str(tmp_path / "no" / "such" / "music.toml")]) == 0
    assert (tmp_path / "no" / "such" / "music.toml").is_file()
    assert main(["init", "-"]) == 1
    assert "not '-'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    for target in ("file", "file/sub"):
        assert main(["init", str(tmp_path / target)]) == 1
        err = capsys.readouterr().err
        assert err == f"chiptune-forge: error: {tmp_path / 'file'}: is a file, not a folder; give a new or existing " \
                      "folder\n"


def test_track_that_is_not_a_table_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, 'track = 5\n\n[project]\noutput_dir = "music"\n')
    assert problems_of(path) == [f"{path}:1: track: expected [[track]] tables, got 5"]


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "chiptune.toml"
    path.write_bytes(b"\xef\xbb\xbf[[track]]\nname = \"a\"\n")
    assert [t.name for t in load_manifest(path).tracks] == ["a"]
