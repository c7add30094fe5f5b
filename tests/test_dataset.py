"""The dataset builder: windows, broken files mixed with good ones, deterministic splits, the CLI."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import mido
import numpy as np
import pytest
from midi_factory import notes_track, simple_song, tempo, with_velocity_over_127, write_song

from chiptune_forge.cli import main
from chiptune_forge.dataset import DatasetOptions, bar_windows, build_dataset, load_split, split_files
from chiptune_forge.encoding import END, START, STEP_END
from chiptune_forge.errors import ChiptuneError
from chiptune_forge.midi import QuantizedPiece


def make_folder(root: Path, good: int = 6) -> Path:
    root.mkdir()
    for i in range(good):
        simple_song(root / f"Song {i} – ünïcode.mid", bars=8 + i)
    return root


def add_broken(root: Path) -> dict[str, str]:
    good = (root / "Song 0 – ünïcode.mid").read_bytes()
    (root / "zero.mid").write_bytes(b"")
    (root / "random.mid").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)))
    (root / "text.mid").write_text("just some text\n")
    (root / "truncated.mid").write_bytes(good[: len(good) - 40])
    write_song(root / "tempo.mid", [[(0, mido.MetaMessage("set_tempo", tempo=1))], notes_track([(60, 0, 100)])])
    return {"zero.mid": "empty", "random.mid": "not a MIDI file", "text.mid": "not a MIDI file",
            "truncated.mid": "broken", "tempo.mid": "absurd tempo"}


def test_bar_windows_cover_everything() -> None:
    piece = QuantizedPiece.from_notes([(60, 0, 1, 100)], num_steps=1100)
    windows = bar_windows(piece, 80, 512)
    assert windows[0] == (0, 512)
    assert all(a % 16 == 0 and b - a <= 512 for a, b in windows)
    covered = np.zeros(1100, bool)
    for a, b in windows:
        covered[a:b] = True
    assert covered.all()
    assert bar_windows(QuantizedPiece.from_notes([], num_steps=40), 80, 512) == []


def test_broken_files_are_reported_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "in")
    reasons = add_broken(root)
    summary = build_dataset(root, tmp_path / "out", DatasetOptions(eval_ratio=0.2), show_progress=False)
    err = capsys.readouterr().err
    skipped = {s["file"]: s["reason"] for s in summary["files_skipped"]}
    assert set(skipped) == set(reasons)
    for name, reason in reasons.items():
        assert reason in skipped[name]
        assert name in err
    assert summary["files_used"] == 6
    assert summary["splits"]["eval"]["files"] == 1
    assert summary["note_steps"]["kept_fraction"] == pytest.approx(1.0)
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))


def test_a_file_with_data_bytes_over_127_is_used_with_a_warning(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "in", good=3)
    with_velocity_over_127(root / "Song 1 – ünïcode.mid")
    summary = build_dataset(root, tmp_path / "out", DatasetOptions(eval_ratio=0.0), show_progress=False)
    assert summary["files_used"] == 3 and summary["files_skipped"] == []
    assert capsys.readouterr().err.splitlines() == [
        "warning: Song 1 – ünïcode.mid: data bytes above 127 (not valid MIDI) were read as 127"]


def test_a_file_too_short_to_keep_counts_as_music_lost(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "in", good=2)
    simple_song(root / "short.mid", bars=2)  # 32 steps, under --min-steps 80
    summary = build_dataset(root, tmp_path / "out", DatasetOptions(eval_ratio=0.0), show_progress=False)
    assert [s["file"] for s in summary["files_skipped"]] == ["short.mid"]
    steps = summary["note_steps"]
    assert steps["kept"] < steps["input"]
    alone = build_dataset(make_folder(tmp_path / "two", good=2), tmp_path / "out2", DatasetOptions(eval_ratio=0.0),
                          show_progress=False)["note_steps"]
    assert steps["kept"] == alone["kept"] and steps["input"] > alone["input"]


def test_sequences_and_transposition(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "in", good=3)
    summary = build_dataset(root, tmp_path / "out", DatasetOptions(eval_ratio=0.0, transpose=(-2, 3)),
                            show_progress=False)
    train = load_split(tmp_path / "out", "train")
    assert summary["splits"]["train"]["sequences"] == len(train) == 3 * 6
    for seq in train:
        assert seq[0] == START and seq[-1] == END
        assert np.sum(seq == STEP_END) >= 80
    # The six versions of the first piece are the same music moved by -2..+3 semitones.
    lowest = [int(e) - 3 for e in train[0] if 3 <= e < 131]
    highest = [int(e) - 3 for e in train[5] if 3 <= e < 131]
    assert [p + 5 for p in lowest] == highest


def test_transposition_out_of_range_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    write_song(root / "high.mid", [[tempo(0, 120)], notes_track([(125, s, s + 4) for s in range(0, 96, 4)])])
    summary = build_dataset(root, tmp_path / "out", DatasetOptions(eval_ratio=0.0), show_progress=False)
    assert summary["splits"]["train"]["sequences"] == 7  # -4..+2 fit in 0..127, +3 and +4 do not


def test_split_is_deterministic_by_seed() -> None:
    files = [Path(f"f{i}.mid") for i in range(50)]
    a = split_files(files, 0.1, seed=7)
    b = split_files(files, 0.1, seed=7)
    c = split_files(files, 0.1, seed=8)
    assert a == b
    assert len(a[1]) == 5 and set(a[0]).isdisjoint(a[1])
    assert a[1] != c[1]


def test_no_usable_file_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    (root / "bad.mid").write_bytes(b"")
    with pytest.raises(ChiptuneError, match="none of the 1 MIDI files was usable"):
        build_dataset(root, tmp_path / "out", DatasetOptions(), show_progress=False)


def test_a_rebuild_keeps_other_files_and_a_failed_one_keeps_the_old_dataset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.npz").write_bytes(b"not ours")
    (out / "notes.txt").write_text("mine")
    build_dataset(make_folder(tmp_path / "big", good=6), out, DatasetOptions(eval_ratio=0.5), show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"weights.npz", "notes.txt", "summary.json"} <= set(before)
    assert len([n for n in before if n.startswith(("train-", "eval-"))]) == 2
    train = load_split(out, "train")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.mid").write_bytes(b"")
    with pytest.raises(ChiptuneError, match="none of the 1 MIDI files was usable"):
        build_dataset(bad, out, DatasetOptions(), show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing staged is left either
    assert [s.tolist() for s in load_split(out, "train")] == [s.tolist() for s in train]

    build_dataset(make_folder(tmp_path / "small", good=2), out, DatasetOptions(eval_ratio=0.0), show_progress=False)
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith("eval-") for n in names)  # the replaced dataset's own shards go
    assert [n for n in names if n.startswith("train-")] == json.loads((out / "summary.json").read_text())[
        "splits"]["train"]["shards"]
    assert {"weights.npz", "notes.txt"} <= names
    assert (out / "weights.npz").read_bytes() == b"not ours"


def test_an_interrupt_at_the_last_moment_still_leaves_the_old_dataset(tmp_path: Path, monkeypatch) -> None:
    import chiptune_forge.dataset as dataset_module

    out = tmp_path / "out"
    build_dataset(make_folder(tmp_path / "a", good=3), out, DatasetOptions(eval_ratio=0.0), show_progress=False)
    train = [s.tolist() for s in load_split(out, "train")]
    real_replace = os.replace

    def interrupted_at_the_summary(src, dst):
        if Path(dst).name == "summary.json":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(dataset_module.os, "replace", interrupted_at_the_summary)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(make_folder(tmp_path / "b", good=1), out, DatasetOptions(eval_ratio=0.0), show_progress=False)
    monkeypatch.undo()
    assert [s.tolist() for s in load_split(out, "train")] == train
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    folder = make_folder(tmp_path / "in", good=1)
    with pytest.raises(ChiptuneError, match="taken: is a file, not a folder"):
        build_dataset(folder, tmp_path / "taken", DatasetOptions(), show_progress=False)
    with pytest.raises(ChiptuneError, match=f"{tmp_path / 'taken'}: is a file, not a folder"):
        build_dataset(folder, tmp_path / "taken" / "sub", DatasetOptions(), show_progress=False)


def test_cli_with_magenta_spellings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "in", good=4)
    sub = root / "more"
    sub.mkdir()
    simple_song(sub / "deep.mid")
    code = main(["dataset", f"--input_dir={root}", f"--output_dir={tmp_path / 'out'}", "--eval_ratio=0.25",
                 "--recursive=true", "--transpose=0,0"])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["files_read"] == 5
    assert summary["options"]["recursive"] is True
    assert "kept 100.0%" in capsys.readouterr().out
    assert main(["dataset", "--input-dir", str(root), "--output-dir", str(tmp_path / "o2"), "--no-recursive",
                 "--transpose", "-2,1"]) == 0
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["options"]["transpose"] == [-2, 1]
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["files_read"] == 4


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dataset", "--input-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing" in err


def test_an_empty_train_split_is_pointed_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "in", good=1)
    assert main(["dataset", "--input-dir", str(root), "--output-dir", str(tmp_path / "o"), "--eval-ratio", "0.99"]) == 0
    assert "warning: the train split is empty" in capsys.readouterr().err


def test_corpus_sample(corpus_dir: Path, tmp_path: Path) -> None:
    """A realistic slice of the corpus: long pieces are windowed, not discarded."""
    root = tmp_path / "in"
    root.mkdir()
    for f in sorted(corpus_dir.glob("*.mid"))[:6]:
        (root / f.name).symlink_to(f)
    summary = build_dataset(root, tmp_path / "out", DatasetOptions(transpose=(0, 0)), show_progress=False)
    steps = summary["note_steps"]
    # The whole corpus keeps about 96%, counting the files that had to be skipped.
    assert steps["kept_fraction"] >= 0.9
    assert steps["kept_fraction"] > steps["reference_discard_rule_fraction"]
    for split in ("train", "eval"):
        for seq in load_split(tmp_path / "out", split):
            assert np.sum(seq == STEP_END) <= 512


def test_a_damaged_dataset_names_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["dataset", "--input-dir", str(make_folder(tmp_path / "in", good=4)), "--output-dir", str(out),
                 "--eval-ratio", "0.25", "--transpose", "0,0"]) == 0
    assert load_split(out, "train")
    shard = out / json.loads((out / "summary.json").read_text())["splits"]["train"]["shards"][0]
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(ChiptuneError, match=f"^{shard}: damaged or missing dataset shard .*rebuild the dataset$"):
        load_split(out, "train")
    shard.unlink()
    with pytest.raises(ChiptuneError, match=f"^{shard}: damaged or missing dataset shard"):
        load_split(out, "train")
    good = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**good, "splits": {"train": {"shards": "abc"}, "eval": {}}}))
    with pytest.raises(ChiptuneError, match="the train shard list is not a list of file names"):
        load_split(out, "train")
    for key, value in (("num_classes", 300), ("steps_per_quarter", 8), ("encoding", "polyphony-0")):
        (out / "summary.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(ChiptuneError, match=f"^{out / 'summary.json'}: {key} .*{value}.*rebuild the dataset$"):
            load_split(out, "eval")
    (out / "summary.json").write_text("{")
    with pytest.raises(ChiptuneError, match=f"^{out / 'summary.json'}: damaged dataset summary"):
        load_split(out, "train")


def _stuck(job: object) -> None:
    time.sleep(30)


def test_ctrl_c_stops_the_workers_at_once(monkeypatch) -> None:
    """Waiting for the pool after an interrupt could hang; the workers are stopped instead."""
    import threading

    import chiptune_forge.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "_process", _stuck)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        list(dataset_module._results([(Path("x.mid"), "x.mid", 80, 512, 0.0)] * 8, 2))
    assert time.monotonic() - started < 10
