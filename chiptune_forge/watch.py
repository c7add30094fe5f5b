"""Watch mode: rebuild what an edit affects while the game is being developed.

The folders holding the manifest, the presets it uses (and the state files and plugin binaries their plugin
roles read), its MIDI and primer files and the model are watched
with watchdog (folders rather than files, so editors that save by writing a temporary file and renaming
it, and files that appear later, are seen). Bursts of events are debounced; every rebuild is the normal
incremental build, so an event that changed nothing costs only a no-op build. Errors never stop watching.
"""

from __future__ import annotations

import signal
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .builder import ASSET_SUFFIXES, CACHE_DIR, BuildBusy, Builder, BuildReport
from .errors import ChiptuneError
from .manifest import ManifestError, load_manifest, manifest_file
from .workers import new_executor, stop_workers

RELEVANT_SUFFIXES = {".toml", ".mid", ".midi", ".npz", ".json", ".vstpreset", ".bin", ".vst3"}
BUSY_RETRY_SECONDS = 0.5


class _Stop(BaseException):
    """Raised from the signal handler to abandon a build in progress (asset writes are atomic)."""


class _Changes(FileSystemEventHandler):
    """Collects relevant paths from watchdog's thread and wakes the main loop."""

    def __init__(self, ignored: Callable[[Path, str], bool]) -> None:
        self.ignored = ignored
        self.lock = threading.Lock()
        self.paths: set[Path] = set()
        self.last = 0.0
        self.wake = threading.Event()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if event.is_directory and event.event_type not in ("created", "deleted", "moved"):
            return
        moved = event.event_type == "moved"
        for raw, kind in ((event.src_path, "deleted" if moved else event.event_type),
                          (getattr(event, "dest_path", ""), "created")):
            if not raw:
                continue
            path = Path(raw if isinstance(raw, str) else raw.decode())
            # A folder that appears may hold the files the manifest names (it gets watched after the next
            # build); one that goes may have held assets; an asset that goes (deleted, or renamed away) must
            # be written again.
            relevant = (event.is_directory or path.suffix.lower() in RELEVANT_SUFFIXES
                        or (kind == "deleted" and path.suffix.lower() in ASSET_SUFFIXES))
            if relevant and not self.ignored(path, kind):
                self.put([path])

    def put(self, paths: Iterable[Path]) -> None:
        """Count paths as changed now (from watchdog's thread, or a build to try again)."""
        with self.lock:
            self.paths.update(paths)
            self.last = time.monotonic()
        self.wake.set()

    def take(self) -> set[Path]:
        with self.lock:
            paths, self.paths = self.paths, set()
        self.wake.clear()
        return paths


def watched_folders(manifest_path: Path, output_dir: Path | None = None) -> set[Path]:
    """Folders to watch: the manifest's, and those of every file it names (read leniently, so a manifest
    that is currently invalid still tells where its presets and MIDI files will appear)."""
    root = manifest_path.parent
    folders = {root}
    try:
        data = tomllib.loads(manifest_path.read_text(encoding="utf-8-sig"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return folders
    project = data.get("project", {}) if isinstance(data.get("project"), dict) else {}
    tracks = [t for t in data.get("track", []) if isinstance(t, dict)] if isinstance(data.get("track"), list) else []
    refs = [project.get("preset")] + [t.get(k) for t in tracks for k in ("preset", "midi", "primer_midi")]
    for ref in refs:
        if isinstance(ref, str) and ("/" in ref or ref.endswith(".toml")):
            preset = (root / ref).expanduser().resolve()
            folders.add(preset.parent)
            folders |= _preset_folders(preset)
        elif isinstance(ref, str) and ref.endswith((".mid", ".midi")):
            folders.add((root / ref).resolve().parent)
    model = project.get("model", "default")
    try:
        from .lstm import resolve_model_dir

        folders.add(resolve_model_dir(None if model == "default" else str((root / model).expanduser())))
    except ChiptuneError:
        if isinstance(model, str) and model != "default":
            folders.add((root / model).resolve().parent)
    from .presets import shipped_presets_dir

    folders.add(shipped_presets_dir())
    if output_dir is not None:
        folders.add(output_dir)
    return {_nearest_folder(f) for f in folders}


def _nearest_folder(path: Path) -> Path:
    """The path itself if it is a folder, else its closest existing ancestor (where it will appear)."""
    for candidate in [path, *path.parents]:
        if candidate.is_dir():
            return candidate
    return path


def _preset_folders(preset: Path) -> set[Path]:
    """Folders of the files a preset's plugin roles and programs read (state files, .vstpreset files, plugin
    binaries)."""
    try:
        data = tomllib.loads(preset.read_text(encoding="utf-8-sig"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return set()
    from .plugins import role_folders

    folders: set[Path] = set()
    for group in ("roles", "programs"):  # roles, and MIDI programs mapped to plugins
        tables = data.get(group) if isinstance(data.get(group), dict) else {}
        for table in tables.values():
            if isinstance(table, dict) and "plugin" in table:
                folders |= {f.resolve() for f in role_folders(table, preset.parent)}
    return folders


class Watcher:
    def __init__(self, manifest: str | Path, debounce: float = 0.2, log: Callable[[str], None] = print,
                 workers: int = 2) -> None:
        self.path = manifest_file(manifest).resolve()
        self.debounce = debounce
        self.log = log
        self.workers = workers
        self.stop = threading.Event()
        self.output_dir: Path | None = None
        self.changes = _Changes(self._ignored)
        self.observer = Observer()
        self.watches: dict[Path, object] = {}
        self.building = False
        self.busy = False
        """Set while another build (a `chiptune-forge build`) holds the project: the changes wait for it."""
        self.executor: ProcessPoolExecutor | None = None

    def _ignored(self, path: Path, event_type: str) -> bool:
        """Builds write the cache and the assets; only an asset (or the output folder) going away, or a
        manifest input kept in the output folder, counts as a change there."""
        parts = path.parts
        if CACHE_DIR in parts or path.name.startswith(".") or path.name.endswith(".partial"):
            return True
        if self.output_dir is None or not path.is_relative_to(self.output_dir):
            return False
        return event_type != "deleted" and path.suffix.lower() in ASSET_SUFFIXES | {""}

    def _rewatch(self) -> None:
        wanted = watched_folders(self.path, self.output_dir)
        for folder in set(self.watches) - wanted:
            self.observer.unschedule(self.watches.pop(folder))
        for folder in wanted - set(self.watches):
            self.watches[folder] = self.observer.schedule(self.changes, str(folder), recursive=False)

    def build_once(self, executor: ProcessPoolExecutor, changed: set[Path]) -> BuildReport | None:
        """One incremental build; prints a status line per rebuilt track, or the manifest's errors."""
        what = ", ".join(sorted(p.name for p in changed)) if changed else "start"
        start = time.perf_counter()
        was_busy, self.busy = self.busy, False  # set again only if another build still holds the project
        try:
            manifest = load_manifest(self.path)
        except ManifestError as exc:
            for line in exc.problems:
                self.log(f"error: {line}")
            self.log(f"watching for the next save (last good assets kept); changed: {what}")
            return None
        except ChiptuneError as exc:  # unreadable or missing manifest
            self.log(f"error: {exc}")
            self.log(f"watching for the next save (last good assets kept); changed: {what}")
            return None
        self.output_dir = manifest.project.output_dir
        self._rewatch()  # before building, so edits made while it runs are seen
        self.building = True
        try:
            builder = Builder(manifest, executor=executor, show_progress=False, log=self.log)
            report = builder.run()
        except BuildBusy as exc:
            if not was_busy:
                self.log(f"{exc.project}: another build is running ({exc.holder}): building once it has finished")
            self.busy = True
            return None
        except ChiptuneError as exc:
            self.log(f"error: {exc}")
            return None
        except (_Stop, KeyboardInterrupt):
            raise
        except Exception as exc:  # watching goes on whatever one build ran into
            self.log(f"error: the build failed unexpectedly ({type(exc).__name__}: {exc}); still watching")
            return None
        finally:
            self.building = False
        if builder.workers_lost:
            self.log("a build worker process died; starting new workers (the next save retries the failed tracks)")
            self._replace_executor()
        stamp = time.strftime("%H:%M:%S")
        for t in report.tracks:
            if t.status == "failed":
                self.log(f"[{stamp}] {t.name}: FAILED ({what}): {t.error}")
            elif t.status == "built":
                redone = ", ".join(t.stages) or "export"
                self.log(f"[{stamp}] {t.name}: {'; '.join(t.reasons) or what} -> {redone} in {t.seconds:.2f} s")
            elif t.status == "removed":
                self.log(f"[{stamp}] {t.name}: removed from the manifest"
                         + (f" -> deleted {len(t.files)} files" if t.files else ""))
        if not report.changed and not report.failed:
            self.log(f"[{stamp}] up to date ({what}) in {time.perf_counter() - start:.2f} s")
        return report

    def run(self, once_after: float | None = None) -> int:
        """Build, then rebuild on changes until SIGINT/SIGTERM or `once_after` seconds have passed."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        deadline = time.monotonic() + once_after if once_after is not None else None
        self.executor = new_executor(self.workers)
        try:
            self._run_loop(deadline)
        except _Stop:
            pass
        finally:
            self.observer.stop()
            stop_workers(self.executor)
            if self.observer.is_alive():
                self.observer.join(timeout=1)
            self._clean_partials()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.log("watch stopped")
        return 0

    def _replace_executor(self) -> None:
        stop_workers(self.executor)
        self.executor = new_executor(self.workers)

    def _run_loop(self, deadline: float | None) -> None:
        self._rewatch()
        self.observer.start()
        self.build_once(self.executor, set())
        if self.busy:
            self.changes.put([self.path])
        self.log(f"watching {self.path} (Ctrl-C to stop)")
        while not self.stop.is_set():
            timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            self.changes.wake.wait(timeout)
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not self.changes.wake.is_set() or self.stop.is_set():
                continue
            # Debounce: wait until the burst has been quiet for `debounce` seconds.
            while not self.stop.is_set() and time.monotonic() - self.changes.last < self.debounce:
                time.sleep(max(0.01, self.debounce - (time.monotonic() - self.changes.last)))
            if self.stop.is_set():
                break
            changed = self.changes.take()
            self.build_once(self.executor, changed)
            if self.busy:  # try again in a moment, with the same changes
                self.changes.put(changed)
                self.stop.wait(BUSY_RETRY_SECONDS)
            self._rewatch()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop.set()
        self.changes.wake.set()
        if self.building:
            raise _Stop

    def _clean_partials(self) -> None:
        if self.output_dir and self.output_dir.is_dir():
            for f in self.output_dir.glob(".*.partial"):
                f.unlink(missing_ok=True)
