"""Watch mode, run as a user runs it: a subprocess, real file edits, bounded waits, signals."""

from __future__ import annotations

import fcntl
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from midi_factory import simple_song

from chiptune_forge.presets import shipped_presets_dir
from chiptune_forge.watch import watched_folders

REPO = Path(__file__).resolve().parents[1]
WAIT = 60.0


class WatchProcess:
    """`chiptune-forge watch` in a subprocess, its stdout read line by line on a thread."""

    def __init__(self, manifest: Path, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chiptune_forge", "watch", str(manifest), "--debounce", "0.2", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, text: str, timeout: float = WAIT) -> str:
        """The next line containing `text`, waiting at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} within {timeout} s; saw: {self.seen[-15:]}")

    def children(self) -> list[int]:
        return children(self.proc.pid)

    def stop(self) -> None:
        """End it as a user would (Ctrl-C), and kill it only if that fails."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=10)


@contextmanager
def watching(manifest: Path) -> Iterator[WatchProcess]:
    """A watch process past its first build, stopped at the end of the block."""
    watch = WatchProcess(manifest, "--once-after", "240")
    try:
        watch.expect("watching")
        yield watch
    finally:
        watch.stop()


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except OSError:
        return False


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "game"
    root.mkdir()
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    shutil.copy(shipped_presets_dir() / "snes_dry.toml", sounds / "mine.toml")
    simple_song(root / "theme.mid", bars=2)
    manifest = root / "chiptune.toml"
    manifest.write_text('[project]\npreset = "../sounds/mine.toml"\nsample_rate = 32000\n\n'
                        '[[track]]\nname = "theme"\nmidi = "theme.mid"\nbars = 2\n')
    return manifest, sounds / "mine.toml"


def wait_for_change(path: Path, old: bytes, timeout: float = WAIT) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and (data := path.read_bytes()) != old:
            return data
        time.sleep(0.05)
    raise AssertionError(f"{path} did not change within {timeout} s")


def test_watch_rebuilds_on_edits_and_survives_errors(project: tuple[Path, Path]) -> None:
    manifest, preset = project
    asset = manifest.parent / "music" / "theme.ogg"
    watch = WatchProcess(manifest, "--once-after", "240")
    try:
        watch.expect("theme:")
        watch.expect("watching")
        first = asset.read_bytes()

        # A preset in another folder, edited in place: the track re-renders.
        preset.write_text(preset.read_text().replace("volume = 0.9", "volume = 0.6"))
        line = watch.expect("theme:")
        assert "preset" in line and "render" in line
        second = wait_for_change(asset, first)

        # A manifest saved with a syntax error: reported with file and line, assets kept, still watching.
        good = manifest.read_text()
        manifest.write_text(good.replace("bars = 2", "bars = = 2"))
        line = watch.expect("error:")
        assert f"{manifest}:8" in line and "syntax" in line
        watch.expect("last good assets kept")
        assert asset.read_bytes() == second

        # The fixed manifest (written the way vim and JetBrains save: temp file + rename) builds again.
        tmp = manifest.with_name("chiptune.toml.swp~")
        tmp.write_text(good.replace("bars = 2", "bars = 1"))
        os.replace(tmp, manifest)
        line = watch.expect("theme:")
        assert "bars" in line
        wait_for_change(asset, second)
    finally:
        watch.stop()


def test_new_preset_file_appearing_later(project: tuple[Path, Path]) -> None:
    manifest, preset = project
    with watching(manifest) as watch:
        newer = preset.with_name("later.toml")
        manifest.write_text(manifest.read_text().replace("mine.toml", "later.toml"))
        line = watch.expect("error:")
        assert "later.toml" in line
        shutil.copy(shipped_presets_dir() / "snes_battle.toml", newer)
        line = watch.expect("theme:")
        assert "preset" in line


def test_presets_in_new_or_output_folders_and_deleted_assets(project: tuple[Path, Path]) -> None:
    manifest, _ = project
    music = manifest.parent / "music"
    with watching(manifest) as watch:
        # A preset in a folder that does not exist yet: the error, then the folder and the file appear.
        manifest.write_text(manifest.read_text().replace("../sounds/mine.toml", "later/dark.toml"))
        watch.expect("error:")
        (manifest.parent / "later").mkdir()
        shutil.copy(shipped_presets_dir() / "snes_dungeon.toml", manifest.parent / "later" / "dark.toml")
        watch.expect("theme:")
        # ...and once there, its edits are seen.
        dark = manifest.parent / "later" / "dark.toml"
        before = (music / "theme.ogg").read_bytes()
        dark.write_text(dark.read_text().replace("feedback = 0.42", "feedback = 0.1"))
        watch.expect("theme:")
        wait_for_change(music / "theme.ogg", before)

        # A preset kept in the output folder is watched like any other.
        shutil.copy(shipped_presets_dir() / "snes_dry.toml", music / "kept.toml")
        manifest.write_text(manifest.read_text().replace("later/dark.toml", "music/kept.toml"))
        watch.expect("theme:")
        before = (music / "theme.ogg").read_bytes()
        kept = music / "kept.toml"
        kept.write_text(kept.read_text().replace("volume = 0.9", "volume = 0.5"))
        watch.expect("theme:")
        wait_for_change(music / "theme.ogg", before)

        # An asset deleted while watching is written again; so is one renamed away.
        (music / "theme.ogg").unlink()
        watch.expect("theme:")
        wait_until(lambda: (music / "theme.ogg").is_file(), WAIT, "theme.ogg written again")
        (music / "theme.ogg").rename(music / "theme_old.ogg")
        watch.expect("theme:")
        wait_until(lambda: (music / "theme.ogg").is_file(), WAIT, "theme.ogg written again after a rename")


def test_a_change_made_while_another_build_runs_is_built_after_it(project: tuple[Path, Path]) -> None:
    """`chiptune-forge build` holding the project: watch waits for it, then builds the change."""
    manifest, preset = project
    music = manifest.parent / "music"
    with watching(manifest) as watch:
        before = (music / "theme.ogg").read_bytes()
        with open(manifest.parent / ".chiptune" / "build.lock", "a+") as held:  # as a running build holds it
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            preset.write_text(preset.read_text().replace("volume = 0.9", "volume = 0.5"))
            watch.expect("building once it has finished")
            time.sleep(1.0)
            assert (music / "theme.ogg").read_bytes() == before
        watch.expect("theme:")
        wait_for_change(music / "theme.ogg", before)


def test_a_bad_save_while_another_build_runs_is_reported_once(project: tuple[Path, Path]) -> None:
    manifest, preset = project
    with watching(manifest) as watch:
        with open(manifest.parent / ".chiptune" / "build.lock", "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            preset.write_text(preset.read_text().replace("volume = 0.9", "volume = 0.5"))
            watch.expect("building once it has finished")
            good = manifest.read_text()
            manifest.write_text(good.replace("bars = 2", 'bars = "two"'))
            watch.expect("watching for the next save")
        time.sleep(3.0)  # the lock is free: nothing to retry until the manifest is fixed
        while not watch.lines.empty():
            watch.seen.append(watch.lines.get())
        assert sum("watching for the next save" in line for line in watch.seen) == 1, watch.seen
        manifest.write_text(good)
        watch.expect("theme:")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_end_cleanly(project: tuple[Path, Path], sig: signal.Signals) -> None:
    manifest, preset = project
    watch = WatchProcess(manifest)
    try:
        watch.expect("watching")
        workers = watch.children()
        preset.write_text(preset.read_text().replace("volume = 0.9", "volume = 0.5"))
        watch.expect("theme:")
        start = time.monotonic()
        watch.proc.send_signal(sig)
        assert watch.proc.wait(timeout=5) == 0
        assert time.monotonic() - start < 1.0
        watch.expect("watch stopped", timeout=5)
        music = manifest.parent / "music"
        assert not [p for p in music.iterdir() if p.name.endswith(".partial")]
        assert workers and not [pid for pid in workers if alive(pid)]
    finally:
        watch.stop()


def test_a_dying_worker_does_not_end_watching(project: tuple[Path, Path]) -> None:
    manifest, preset = project
    asset = manifest.parent / "music" / "theme.ogg"
    watch = WatchProcess(manifest)
    try:
        watch.expect("watching")
        workers = watch.children()
        os.kill(workers[0], signal.SIGKILL)  # as the kernel's OOM killer or a crashing library would
        old = asset.read_bytes()
        preset.write_text(preset.read_text().replace("volume = 0.9", "volume = 0.5"))
        watch.expect("worker process died")
        preset.write_text(preset.read_text().replace("volume = 0.5", "volume = 0.4"))
        assert "render" in watch.expect("theme:")  # new workers build the next save
        wait_for_change(asset, old)
        assert watch.proc.poll() is None
    finally:
        watch.stop()


def test_workers_end_when_watch_is_killed(project: tuple[Path, Path]) -> None:
    manifest, _ = project
    watch = WatchProcess(manifest)
    try:
        watch.expect("watching")
        workers = watch.children()
        assert workers
        watch.proc.kill()  # no chance to clean up
        watch.proc.wait(timeout=10)
        wait_until(lambda: not [pid for pid in workers if alive(pid)], 5.0, "the build workers did not exit")
    finally:
        watch.stop()


def test_folders_of_presets_and_what_their_plugin_roles_read_are_watched(tmp_path: Path) -> None:
    game, sounds, states, plugins = (tmp_path / d for d in ("game", "sounds", "states", "plugins"))
    for folder in (game, sounds, states, plugins):
        folder.mkdir()
    (sounds / "lead.toml").write_text('[roles.lead]\nplugin = "../plugins/Later.vst3"\n'
                                      'state_file = "../states/lead.bin"\n')
    (game / "chiptune.toml").write_text('[project]\npreset = "../sounds/lead.toml"\n[[track]]\nname = "a"\n')
    folders = watched_folders(game / "chiptune.toml")
    assert {game, sounds, states, plugins} <= folders  # a plugin not installed yet is watched where it will be
    (sounds / "lead.toml").write_text("[roles.lead\n")  # broken: still watched, its side files unknown
    assert {game, sounds} <= watched_folders(game / "chiptune.toml")
    (sounds / "lead.toml").write_text('\ufeff[programs.5]\nplugin = "../plugins/Later.vst3"\n')
    (game / "chiptune.toml").write_text("\ufeff" + (game / "chiptune.toml").read_text())
    assert {game, sounds, plugins} <= watched_folders(game / "chiptune.toml"), "byte-order marks, programs"


def test_once_after_ends_by_itself(project: tuple[Path, Path]) -> None:
    manifest, _ = project
    watch = WatchProcess(manifest, "--once-after", "1")
    try:
        watch.expect("watch stopped")
        assert watch.proc.wait(timeout=10) == 0
    finally:
        watch.stop()


def test_a_missing_manifest_is_an_error_not_a_watch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from chiptune_forge.cli import main

    assert main(["watch", str(tmp_path / "nosuch"), "--once-after", "5"]) == 2
    assert capsys.readouterr().err == (f"chiptune-forge: error: {tmp_path / 'nosuch'}: manifest not found "
                                       "(create one with 'chiptune-forge init')\n")


def test_an_unreadable_manifest_still_says_it_keeps_watching(tmp_path: Path) -> None:
    from chiptune_forge.watch import Watcher

    manifest = tmp_path / "chiptune.toml"
    manifest.write_bytes(b"[project]\noutput_dir = \"\xff\"\n")
    lines: list[str] = []
    assert Watcher(manifest, log=lines.append).build_once(None, {manifest}) is None
    assert lines[0].startswith("error: ") and str(manifest) in lines[0]
    assert lines[1] == "watching for the next save (last good assets kept); changed: chiptune.toml"
