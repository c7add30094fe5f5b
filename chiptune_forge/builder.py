"""The build step: a manifest in, a folder of game-ready loops out, doing only the work whose inputs changed.

Each track goes through three stages, each keyed by a hash of exactly what it depends on:

- take: the chosen piece's events. Comes from `chiptune.lock` when the lock's inputs match, else from
  the generation cache (`.chiptune/gen/`), else the model generates every candidate as one batch.
- render: MIDI (derived from the take at the track's tempo and transpose, or a given MIDI file) + preset +
  loop settings -> audio, cached in `.chiptune/audio/` with its measured loudness.
- export: audio + gain + formats -> asset files, written under temporary names and renamed into place.

`.chiptune/state.json` records each stage's key and inputs per track, so a no-op build only hashes inputs
and compares; nothing heavy is imported then (TensorFlow never is; the model only when generating).
Another manifest in the folder (NAME.toml) has its own NAME.lock and `.chiptune/state-NAME.json`.

Takes are the lock's by generation settings, not by name: a renamed track keeps its take. Only files an
export wrote (recorded in the state, or listed by the sidecar it wrote) are ever deleted.
"""

from __future__ import annotations

import base64
import fcntl
import glob
import hashlib
import json
import math
import os
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ChiptuneError, UsageError
from .loops import godot_import_file
from .manifest import (
    CACHE_DIR,
    LOCK_NAME,
    MANIFEST_NAME,
    Manifest,
    Neighbour,
    TrackSpec,
    load_manifest,
    lock_and_state,
    neighbours,
)
from .presets import Preset, load_preset
from .workers import held_fds, new_executor, stop_workers

ASSET_SUFFIXES = frozenset({".ogg", ".wav", ".json", ".import"})
"""What an export writes: the only kinds of file a build ever deletes."""
LOCK_VERSION = 2
"""2: entries are valid for their track's generation settings alone (not the model or the tool's version)."""
BUILD_VERSION = 4
"""Part of every cache key: raised when a stage computes something different (2: sparseness in the ranking;
3: per-output seeds from SeedSequence)."""
MAX_POLYPHONY = 8
STEPS_PER_BAR = 16


@dataclass
class TrackReport:
    """What happened to one track: `status` is built, skipped, failed, outdated (with --check) or removed (no
    longer in the manifest: its assets were deleted)."""

    name: str
    status: str = "skipped"
    reasons: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


@dataclass
class BuildReport:
    manifest: str
    tracks: list[TrackReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[TrackReport]:
        return [t for t in self.tracks if t.status == "failed"]

    @property
    def changed(self) -> list[TrackReport]:
        return [t for t in self.tracks if t.status in ("built", "outdated", "removed")]

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": self.manifest, "ok": not self.failed, "seconds": round(self.seconds, 3),
                "tracks": [asdict(t) | {"seconds": round(t.seconds, 3)} for t in self.tracks], "errors": []}


# ------------------------------------------------------------------------------------------ hashing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def key_of(inputs: dict[str, Any]) -> str:
    """A stable hash of a stage's inputs (sorted JSON)."""
    return sha256_bytes(json.dumps(inputs, sort_keys=True, default=str).encode())[:32]


def lock_only(plan: dict[str, Any]) -> bool:
    """A take made earlier (in the generation cache) that only needs recording in the lock: nothing to render
    or export."""
    return plan.get("take") == "cache" and not (plan["render"] or plan["export"])


def _file_stamp(path: str) -> list:
    """[size, mtime_ns, sha256] of a written asset, so a later build can tell it was altered on disk."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, sha256_file(Path(path))]


def _file_intact(path: str, stamp: list | None) -> bool:
    """Whether an asset is still what the build wrote: same size, and same time or (a checkout or copy that
    touched it) same contents. State from before stamps were kept counts as intact."""
    if not stamp:
        return True
    st = os.stat(path)
    if st.st_size != stamp[0]:
        return False
    return st.st_mtime_ns == stamp[1] or sha256_file(Path(path)) == stamp[2]


def changed_inputs(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """The inputs that differ from the recorded ones (compared as stored: tuples read back as lists)."""
    if old is None:
        return ["new"]
    new = json.loads(json.dumps(new, default=str))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


# ----------------------------------------------------------------------------------- small file store


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside the target under a name no engine takes for an asset, then rename into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return default


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


class BuildBusy(ChiptuneError):
    """Another build holds the project (watch mode waits for it and tries again)."""

    def __init__(self, project: Path, holder: str) -> None:
        super().__init__(f"{project}: another build is running ({holder}); wait for it to finish")
        self.project, self.holder = project, holder


@contextmanager
def build_lock(cache: Path) -> Iterator[None]:
    """One build at a time per project: a second one fails fast instead of racing on the same files."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "build.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise BuildBusy(cache.parent, holder) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        # Forked workers close their copy, or a build killed outright would stay 'running' until its last
        # worker exited.
        held_fds.add(fh.fileno())
        try:
            yield
        finally:
            held_fds.discard(fh.fileno())
            fcntl.flock(fh, fcntl.LOCK_UN)


def _manifest_of_lock(lock: Path) -> Path:
    """The manifest file a lock belongs to (the inverse of lock_and_state)."""
    return lock.parent / (MANIFEST_NAME if lock.name == LOCK_NAME else f"{lock.stem}.toml")


def _is_chiptune_lock(path: Path) -> bool:
    """Whether a *.lock file is one of ours (other tools keep uv.lock, poetry.lock, yarn.lock, ... there)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and isinstance(data.get("tracks"), dict) and isinstance(data.get("version"), int)
            and set(data) <= {"version", "tracks"})


def legacy_lock_and_state(manifest_path: Path, others: list[Neighbour]) -> tuple[Path, Path] | None:
    """The lock (and state) this manifest had under an earlier name: it has no lock of its own, no other
    manifest with tracks (`others`) shares its folder, and the folder has exactly one lock whose manifest is
    gone (the manifest file was renamed, or an earlier version called every manifest's lock chiptune.lock)."""
    if others or lock_and_state(manifest_path)[0].exists():
        return None
    orphans = [lock for lock in manifest_path.parent.glob("*.lock")
               if _is_chiptune_lock(lock) and not _manifest_of_lock(lock).exists()]
    return lock_and_state(_manifest_of_lock(orphans[0])) if len(orphans) == 1 else None


# ------------------------------------------------------------------------------------------- the model


class ModelRef:
    """The manifest's model, loaded on first use (numpy only); its fingerprint keys the generation cache."""

    def __init__(self, spec: str) -> None:
        from .lstm import resolve_model_dir

        self.spec = spec
        self.dir = resolve_model_dir(None if spec == "default" else spec)
        self._model = None
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 of model.json and weights.npz as files: no need to load the model to know it changed."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name in ("model.json", "weights.npz"):
                try:
                    digest.update(sha256_file(self.dir / name).encode())
                except OSError as exc:
                    raise ChiptuneError(f"{self.dir / name}: cannot read the model ({exc.strerror or exc})") from None
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def load(self):
        if self._model is None:
            from .lstm import load_model

            self._model = load_model(self.dir)
        return self._model


# ---------------------------------------------------------------------------------------- track stages


def generation_settings(track: TrackSpec) -> dict[str, Any]:
    """What the manifest asks of a track's generation: what a locked take stays valid for."""
    primer_midi = sha256_file(track.primer_midi) if track.primer_midi and track.primer_midi.is_file() else None
    return {"bars": track.intro_bars + track.bars, "seed": track.seed,
            "temperature": track.temperature, "primer_pitches": track.primer_pitches,
            "primer_melody": track.primer_melody, "primer_midi": primer_midi, "candidates": track.candidates,
            "max_polyphony": MAX_POLYPHONY}


def generation_inputs(track: TrackSpec, model_fp: str) -> dict[str, Any]:
    """Everything a generation depends on: the settings, the model and this version's generator."""
    return {"model": model_fp, **generation_settings(track), "version": BUILD_VERSION}


def lock_inputs(track: TrackSpec) -> dict[str, Any]:
    """What a lock entry is valid for. Not the model nor the tool's version: a lock pins the music until the
    track's own settings change or `--regenerate` drops it."""
    return {"settings": generation_settings(track), "pick": track.pick}


def take_inputs(gen_key: str, track: TrackSpec) -> dict[str, Any]:
    return {"generation": gen_key, "pick": track.pick}


def midi_from_events(events: np.ndarray, track: TrackSpec) -> bytes:
    """The take as MIDI bytes at the track's tempo and transposition (pure: same events -> same bytes)."""
    import io

    from .encoding import decode
    from .midi import build_midifile, piece_from_quantized

    quantized = decode(events, qpm=track.tempo)
    if track.transpose:
        moved = quantized.transposed(track.transpose)
        if moved is None:
            raise ChiptuneError(f"track {track.name!r}: transpose {track.transpose} moves notes outside 0..127")
        quantized = moved
    buf = io.BytesIO()
    build_midifile(piece_from_quantized(quantized)).save(file=buf)
    return buf.getvalue()


def midi_from_file(track: TrackSpec, manifest: Path, sample_rate: int, log: Callable[[str], None]) -> bytes:
    """A given MIDI file, transposed if asked (re-written so the render sees exactly the hashed bytes).

    The file and the track's bars are checked here, before any rendering, so that a problem is reported on
    the manifest key it comes from (`midi`, `transpose`, `bars`); what was wrong in the file but could be read
    anyway goes to `log` as a warning.
    """
    import io

    from .loops import RequestError, check_request
    from .midi import Piece, build_midifile, read_midi

    try:
        piece = read_midi(track.midi)  # a broken file is reported under its own name, not the cache copy's
    except ChiptuneError as exc:
        raise ChiptuneError(f"{track.at(manifest, 'midi')}{exc}") from None
    if not piece.notes:
        raise ChiptuneError(f"{track.at(manifest, 'midi')}{track.midi}: no notes to render")
    for warning in piece.warnings:
        log(f"{track.at(manifest, 'midi')}warning: {track.midi}: {warning}")
    try:
        check_request(piece, sample_rate, track.loop, track.intro_bars, track.bars)
    except RequestError as exc:
        raise ChiptuneError(f"{track.at(manifest, exc.key)}{exc} in {track.midi.name}") from None
    if not track.transpose:
        return track.midi.read_bytes()
    notes = []
    for n in piece.notes:
        pitch = n.pitch if n.is_drum else n.pitch + track.transpose
        if not 0 <= pitch <= 127:
            raise ChiptuneError(f"{track.at(manifest, 'transpose')}{track.transpose} moves note {n.pitch} of "
                                f"{track.midi.name} outside 0..127")
        notes.append(replace(n, pitch=pitch))
    buf = io.BytesIO()
    build_midifile(Piece(notes, piece.tempos, piece.time_signatures, piece.track_names, piece.controls)).save(file=buf)
    return buf.getvalue()


@dataclass(frozen=True)
class RenderJob:
    """Everything a worker process needs to render and export one track (picklable)."""

    name: str
    midi_path: str
    preset: Preset
    sample_rate: int
    loop: bool
    intro_bars: int
    bars: int | None
    audio_path: str


@dataclass(frozen=True)
class ExportJob:
    name: str
    audio_path: str
    out_dir: str
    formats: tuple[str, ...]
    target_lufs: float
    true_peak_db: float
    gain_db: float | None
    godot_import: bool
    split: bool
    sidecar: dict[str, Any]


def render_job(job: RenderJob) -> dict[str, Any]:
    """Render one track to the audio cache; returns its loudness and loop facts (runs in a worker)."""
    start = time.perf_counter()
    from .export import measure_loudness, true_peak_db
    from .loops import render_track
    from .midi import read_midi
    from .render import RenderStats, render_piece

    piece = read_midi(job.midi_path)
    stats = RenderStats()
    track = render_track(piece, lambda p, sr: render_piece(p, job.preset, sr, stats=stats), job.sample_rate,
                         loop=job.loop, intro_bars=job.intro_bars, bars=job.bars)
    loudness = measure_loudness(track)
    peak = true_peak_db(track.audio, track.sample_rate)
    meta = {"sample_rate": track.sample_rate, "loop_start": track.loop_start, "loop_length": track.loop_length,
            "qpm": track.qpm, "bars": track.bars, "intro_bars": track.intro_bars, "loudness_lufs": loudness,
            "true_peak_db": peak, "frames": int(track.audio.shape[0]),
            "clip_warning": stats.warning(job.preset) if stats.clipped or stats.overshoot else None}
    tmp = Path(job.audio_path + f".{os.getpid()}.partial")
    with open(tmp, "wb") as fh:
        np.savez(fh, audio=track.audio, meta=json.dumps(meta))
    os.replace(tmp, job.audio_path)
    return meta | {"seconds": time.perf_counter() - start}


def load_track_audio(path: str):
    from .loops import TrackAudio

    try:
        with np.load(path) as data:
            audio = data["audio"]
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ChiptuneError(f"{path}: the cached render is damaged ({exc}); build with --force to render again") \
            from None
    return TrackAudio(audio=audio, sample_rate=meta["sample_rate"], loop_start=meta["loop_start"],
                      loop_length=meta["loop_length"], qpm=meta["qpm"], bars=meta["bars"],
                      intro_bars=meta["intro_bars"]), meta


@dataclass(frozen=True)
class HeadroomJob:
    audio_path: str
    formats: tuple[str, ...]
    true_peak_db: float


def headroom_job(job: HeadroomJob) -> dict[str, float]:
    """The most gain a rendered track takes before a file in `formats` passes the true-peak ceiling, the
    codec's overshoot included (runs in a worker). Same-gain builds take the smallest of these."""
    start = time.perf_counter()
    from .export import fit_ceiling

    track, _ = load_track_audio(job.audio_path)
    return {"headroom_db": fit_ceiling(track, math.inf, job.true_peak_db, job.formats),
            "seconds": time.perf_counter() - start}


def export_job(job: ExportJob) -> dict[str, Any]:
    """Normalize and write one track's asset files atomically (runs in a worker)."""
    start = time.perf_counter()
    from .export import export_track, normalize

    track, meta = load_track_audio(job.audio_path)
    loudness = meta["loudness_lufs"]
    track, gain = normalize(track, target_lufs=job.target_lufs, true_peak_db=job.true_peak_db, gain_db=job.gain_db,
                            formats=job.formats, loudness_lufs=loudness)
    sidecar = dict(job.sidecar) | {"gain_db": round(gain, 3), "source_loudness_lufs": loudness}
    paths = export_track(track, Path(job.out_dir), job.name, formats=job.formats, sidecar_info=sidecar,
                         godot_import=job.godot_import, split=job.split, loudness_lufs=loudness + gain)
    return {"files": [str(p) for p in paths], "gain_db": gain, "seconds": time.perf_counter() - start}


LOCK_ENTRY_KEYS = {"candidate": int, "generation": str, "inputs_sha256": str, "model_sha256": str,
                   "midi_sha256": str, "events": str}


def _entry_complete(entry: Any) -> bool:
    """Whether a lock entry has every field a build reads, each of the right type."""
    return isinstance(entry, dict) and all(isinstance(entry.get(k), t) and not isinstance(entry.get(k), bool)
                                           for k, t in LOCK_ENTRY_KEYS.items())


def _take_digest(entry: dict) -> str:
    """What the build state remembers of a locked take, to notice an edit of the lock."""
    return sha256_bytes(entry["events"].encode())


def _state_entry_sound(entry: Any) -> bool:
    """Whether a build-state entry has the shapes a build reads (anything else is forgotten and rebuilt)."""
    if not isinstance(entry, dict):
        return False
    files, stamps, meta = entry.get("files", []), entry.get("file_stamps", {}), entry.get("audio_meta") or {}
    headroom = meta.get("headroom_db", {}) if isinstance(meta, dict) else None
    return (isinstance(files, list) and all(isinstance(f, str) and f for f in files)
            and isinstance(stamps, dict) and all(isinstance(v, list) and len(v) == 3 for v in stamps.values())
            and isinstance(entry.get("render_key"), str | None)
            and all(isinstance(entry.get(k, {}), dict | None) for k in ("gen_inputs", "render_inputs",
                                                                          "export_inputs", "audio_meta"))
            and (not meta or isinstance(meta.get("loudness_lufs"), int | float))
            and isinstance(headroom, dict) and all(isinstance(v, int | float) for v in headroom.values()))


def _zip_intact(path: Path) -> bool:
    """Whether a cache file (.npz) reads back whole: every member there and matching its checksum."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _pick(gen_path: Path, track: TrackSpec) -> tuple[np.ndarray, int]:
    """The track's pick from a generation cache file: its events and candidate index."""
    with np.load(gen_path) as data:
        offsets = data["offsets"]
        events = data["events"]
        order = json.loads(str(data["ranking"]))
    index = order[0] if track.pick == "best" else int(track.pick)
    return events[offsets[index]:offsets[index + 1]].copy(), index


# ------------------------------------------------------------------------------------------ the builder


class Builder:
    """One build of one manifest. `run()` does the work; watch mode makes one per change."""

    def __init__(self, manifest: Manifest, *, only: list[str] | None = None, force: bool = False,
                 regenerate: list[str] | None = None, check: bool = False, executor: Executor | None = None,
                 workers: int | None = None, log: Callable[[str], None] | None = None,
                 show_progress: bool = True) -> None:
        self.m = manifest
        self.root = manifest.root
        self.cache = self.root / CACHE_DIR
        self.lock_path, self.state_path = lock_and_state(manifest.path)
        self.neighbours = neighbours(manifest.path)
        self._legacy = legacy_lock_and_state(manifest.path, self.neighbours)
        if self._legacy is not None:  # read from there; a build renames them to this manifest's own names
            self.lock_path, self.state_path = self._legacy
        self.only = set(only or [])
        unknown = self.only - {t.name for t in manifest.tracks}
        unknown |= set(regenerate or []) - {t.name for t in manifest.tracks}
        if unknown:
            names = ", ".join(t.name for t in manifest.tracks)
            raise UsageError(f"{manifest.path}: no track named {', '.join(sorted(unknown))} (tracks: {names})")
        self.force = force
        self.regenerate = set(regenerate or [])
        self.check = check
        self.executor = executor
        self._told_old_lock = False
        self.workers_lost = False
        """Set when a worker of the given executor died: that pool takes no more work (watch mode replaces it)."""
        self.workers = workers or min(2, os.cpu_count() or 1)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.show_progress = show_progress
        self._model: ModelRef | None = None
        self._renamed_away: dict[str, str] = {}
        """Track name -> the other name whose locked take it keeps (renamed or swapped tracks)."""
        self._told_renames: set[str] = set()
        self._others: set[str] | None = None

    @property
    def model(self) -> ModelRef:
        if self._model is None:
            self._model = ModelRef(self.m.project.model)
        return self._model

    def selected(self) -> list[TrackSpec]:
        return [t for t in self.m.tracks if not self.only or t.name in self.only]

    def run(self) -> BuildReport:
        start = time.perf_counter()
        report = BuildReport(str(self.m.path))
        if self.check:
            self._plan(report)
            report.tracks += [TrackReport(name, "outdated", reasons=["removed from the manifest"])
                              for name in self._removed(self._state(), self._lock())]
        else:
            with build_lock(self.cache):
                self._adopt_legacy_lock()
                self._clean_partials()
                self._build(report)
                self._drop_removed(report)
        report.seconds = time.perf_counter() - start
        return report

    def _adopt_legacy_lock(self) -> None:
        """Give this manifest's takes and state their own names (NAME.lock), so that a manifest added beside
        it later never shares them."""
        if self._legacy is None:
            return
        own_lock, own_state = lock_and_state(self.m.path)
        try:
            os.replace(self._legacy[0], own_lock)
            if self._legacy[1].exists():
                os.replace(self._legacy[1], own_state)
        except OSError as exc:
            raise ChiptuneError(f"{self._legacy[0]}: cannot rename it to {own_lock.name} "
                                f"({exc.strerror or exc})") from None
        self.log(f"{self.m.path.name}: its lock is now {own_lock.name} (it was {self._legacy[0].name}, the lock "
                 f"of a manifest that is gone); commit the rename")
        self.lock_path, self.state_path, self._legacy = own_lock, own_state, None

    # ---- planning: the cheap pass that decides what must be done

    def _state(self) -> dict[str, Any]:
        """The cache's record of the last build; anything unreadable means an empty cache (it is rebuilt)."""
        state = read_json(self.state_path, {})
        if isinstance(state, dict) and state.get("version") == BUILD_VERSION and isinstance(state.get("tracks"), dict):
            state["tracks"] = {name: entry for name, entry in state["tracks"].items() if _state_entry_sound(entry)}
            return state
        return {"version": BUILD_VERSION, "tracks": {}}

    def _lock(self) -> dict[str, Any]:
        """The lock's takes. A damaged lock is an error, not an empty one: silently generating new takes
        would break the promise that a committed lock reproduces the same music."""
        try:
            lock = json.loads(self.lock_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            lock = {}
        except (OSError, ValueError) as exc:
            raise UsageError(f"{self.lock_path}: cannot read the lock ({getattr(exc, 'strerror', None) or exc}); "
                             f"restore it from version control, or delete it to generate new takes") from None
        if not isinstance(lock, dict) or not isinstance(lock.get("tracks", {} if not lock else None), dict):
            raise UsageError(f"{self.lock_path}: not a chiptune-forge lock (expected an object with 'tracks'); "
                             f"restore it from version control, or delete it to generate new takes")
        version = lock.get("version")
        if version == LOCK_VERSION:
            return self._follow_renames(lock)
        if lock and (not isinstance(version, int) or isinstance(version, bool) or version > LOCK_VERSION):
            what = ("has no lock format version" if version is None else
                    f"is written in lock format {version!r}, which this version of chiptune-forge does not read "
                    f"(it reads {LOCK_VERSION})")
            raise UsageError(f"{self.lock_path}: {what}; restore it from version control, update chiptune-forge, "
                             f"or delete it to generate new takes")
        if lock and not self._told_old_lock:
            self._told_old_lock = True
            self.log(f"{self.lock_path}: written in lock format {lock.get('version')!r}, this version reads "
                     f"{LOCK_VERSION}; its takes are generated again and the lock rewritten")
        return {"version": LOCK_VERSION, "tracks": {}}

    def _track_plan(self, track: TrackSpec, state: dict, lock: dict) -> dict[str, Any]:
        """Keys and reasons for one track, without generating or rendering anything."""
        old = state["tracks"].get(track.name, {})
        plan: dict[str, Any] = {"reasons": [], "generate": False}
        if track.midi is not None:
            if track.name in self.regenerate:
                self.log(f"{track.name}: --regenerate does nothing for a track rendered from its midi file")
            plan["take"] = None
            plan["midi_inputs"] = {"midi_file": sha256_file(track.midi), "transpose": track.transpose}
        else:
            gen_in = generation_inputs(track, self.model.fingerprint)
            gen_key = key_of(gen_in)
            plan["gen_inputs"], plan["gen_key"] = gen_in, gen_key
            take_key = key_of(take_inputs(gen_key, track))
            plan["lock_key"] = key_of(lock_inputs(track))
            locked = lock["tracks"].get(track.name)
            if locked is not None and not _entry_complete(locked) and track.name not in self.regenerate:
                raise ChiptuneError(f"{self.lock_path}: the entry for track {track.name!r} is damaged; run with "
                                    f"'--regenerate {track.name}' to take a new one")
            if locked and locked.get("inputs_sha256") == plan["lock_key"] and track.name not in self.regenerate:
                plan["take"] = "lock"
                built = old.get("take_sha256")
                if built is not None and built != _take_digest(locked):
                    plan["take_changed"] = True  # edited in the lock (by hand, or a merge): the lock wins
                    plan["reasons"].append("the locked take changed")
                take_key = key_of(take_inputs(locked["generation"], track))  # the take as it was made
                if locked.get("model_sha256") != self.model.fingerprint:
                    self.log(f"{track.name}: the locked take came from another model; "
                             f"'--regenerate {track.name}' takes a new one from {self.m.project.model}")
            elif (self.cache / "gen" / f"{gen_key}.npz").is_file() and track.name not in self.regenerate:
                plan["take"] = "cache"
                plan["reasons"].append("pick changed" if locked and locked.get("generation") == gen_key
                                       else "take not locked")
            else:
                plan["take"] = "generate"
                plan["generate"] = True
                why = changed_inputs(old.get("gen_inputs"), gen_in) or ["no take locked or cached"]
                if track.name in self.regenerate:
                    why = ["--regenerate"]
                    if (locked and locked.get("inputs_sha256") == plan["lock_key"]
                            and locked.get("model_sha256") == self.model.fingerprint):
                        self.log(f"{track.name}: the same model and seed make the same take again; change the "
                                 "track's seed for new music")
                plan["reasons"].append("generation: " + ", ".join(why))
            plan["take_key"] = take_key
            plan["midi_inputs"] = {"take": take_key, "tempo": track.tempo, "transpose": track.transpose}
        plan["midi_key"] = key_of(plan["midi_inputs"])
        # Loaded once: the render uses these very settings, even if the file is edited during the build.
        plan["preset"] = load_preset(self.m.preset_for(track), base_dir=self.root)
        render_in = self._render_inputs(track, plan["midi_key"], plan["preset"])
        plan["render_inputs"], plan["render_key"] = render_in, key_of(render_in)
        export_in = self._export_inputs(track)
        plan["export_inputs"] = export_in
        needs_render = (old.get("render_key") != plan["render_key"]
                        or not zipfile.is_zipfile(self.cache / "audio" / f"{plan['render_key']}.npz"))
        if old.get("render_key") != plan["render_key"]:
            plan["reasons"].append("render: " + ", ".join(changed_inputs(old.get("render_inputs"), render_in)))
        elif needs_render:
            plan["reasons"].append("render: audio cache missing or damaged")
        plan["render"] = needs_render or self.force or plan.get("take_changed", False)
        files = self._recorded_files(old)
        stamps = {str(self.root / f): stamp for f, stamp in old.get("file_stamps", {}).items()}
        present = bool(files) and all(self._owns(f) and Path(f).is_file() for f in files)
        intact = present and all(_file_intact(f, stamps.get(f)) for f in files)
        files_ok = present and intact
        export_changed = old.get("export_inputs") != export_in
        if export_changed and not plan["render"]:
            plan["reasons"].append("export: " + ", ".join(changed_inputs(old.get("export_inputs"), export_in)))
        if files and not present:
            plan["reasons"].append("output missing")
        elif files and not intact:
            plan["reasons"].append("output changed on disk")
        plan["export"] = plan["render"] or export_changed or not files_ok or self.force
        if self.force and not plan["reasons"]:
            plan["reasons"].append("--force")
        return plan

    def _follow_renames(self, lock: dict) -> dict:
        """The lock with each take under its track's current name. A track with no take of its own (new
        name, or its settings changed) takes over another name's entry with exactly its settings whose own
        track is gone or has other settings now: a renamed track, or two swapped names, keep their takes
        (the name is not a generation setting). Decided from the lock as read, whatever this build selects."""
        entries = lock["tracks"]
        current = {t.name: key_of(lock_inputs(t)) for t in self.m.tracks if t.midi is None}
        moved: dict[str, Any] = {}
        taken: dict[str, str] = {}
        for name, key in current.items():
            own = entries.get(name)
            if name in self.regenerate or (_entry_complete(own) and own["inputs_sha256"] == key):
                continue
            for other, entry in sorted(entries.items(), key=lambda item: (item[0] in current, item[0])):
                if (other != name and other not in taken.values() and _entry_complete(entry)
                        and entry["inputs_sha256"] == key and current.get(other) != key):
                    moved[name], taken[name] = entry, other
                    break
        if not moved:
            return lock
        self._renamed_away |= taken
        tracks = {n: e for n, e in entries.items() if n not in taken.values()} | moved
        for name, other in sorted(taken.items()):
            if name not in self._told_renames:
                self._told_renames.add(name)
                self.log(f"{name}: keeps the take locked for {other!r} (same generation settings)")
        return lock | {"tracks": tracks}

    def _render_inputs(self, track: TrackSpec, midi_key: str, preset: Preset) -> dict[str, Any]:
        return {"midi": midi_key, "preset": preset.fingerprint(), "sample_rate": self.m.project.sample_rate,
                "loop": track.loop, "intro_bars": track.intro_bars, "bars": track.bars, "version": BUILD_VERSION}

    def _export_inputs(self, track: TrackSpec) -> dict[str, Any]:
        p = self.m.project
        return {"formats": list(self.m.formats_for(track)), "loudness_lufs": p.loudness_lufs,
                "true_peak_db": p.true_peak_db, "same_gain": p.same_gain, "godot_import": p.godot_import,
                "split": p.split, "output_dir": os.path.relpath(p.output_dir, self.root), "name": track.name}

    def _check_not_shared(self, name: str) -> None:
        """Two manifests with a track of one name exporting into one folder would overwrite each other's
        files on every build; that track fails in both until one of them changes."""
        out = self.m.project.output_dir.resolve()
        for other in self.neighbours:
            if name in other.tracks and other.output_dir is not None and other.output_dir.resolve() == out:
                raise ChiptuneError(f"{other.path.name} also has a track {name!r} exporting to {out}: the two "
                                    "would overwrite each other's files; rename one of the tracks or give one "
                                    "manifest another output_dir")

    def _plan(self, report: BuildReport) -> dict[str, dict[str, Any]]:
        state, lock = self._state(), self._lock()
        plans = {}
        for track in self.selected():
            try:
                self._check_not_shared(track.name)
                plan = self._track_plan(track, state, lock)
            except ChiptuneError as exc:
                report.tracks.append(TrackReport(track.name, "failed", error=str(exc)))
                continue
            plans[track.name] = plan
            todo = plan["generate"] or plan["render"] or plan["export"] or lock_only(plan)
            status = ("outdated" if self.check else "pending") if todo else "skipped"
            report.tracks.append(TrackReport(track.name, status, reasons=list(plan["reasons"]),
                                             files=self._recorded_files(state["tracks"].get(track.name, {}))))
        if self.m.project.same_gain and any(p["render"] or p["export"] for p in plans.values()):
            # One shared gain: new audio or another track's formats (its codec headroom) can change it.
            for t in report.tracks:
                if t.status == "skipped":
                    t.status = "outdated" if self.check else "pending"
                    t.reasons.append("same_gain: shared gain may change")
                    plans[t.name]["export"] = True
        for name, plan in plans.items():
            if plan["export"] and not plan["render"] and not _zip_intact(self.cache / "audio" /
                                                                         f"{plan['render_key']}.npz"):
                plan["render"] = True
                next(t for t in report.tracks if t.name == name).reasons.append(
                    "render: audio cache missing or damaged")
        return plans

    # ---- building

    def _build(self, report: BuildReport) -> None:
        plans = self._plan(report)
        by_name = {t.name: t for t in report.tracks}
        pending = [t for t in self.selected() if by_name[t.name].status == "pending"]
        if not pending:
            return
        for sub in ("gen", "midi", "audio"):
            (self.cache / sub).mkdir(parents=True, exist_ok=True)
        self.m.project.output_dir.mkdir(parents=True, exist_ok=True)
        state, lock = self._state(), self._lock()

        # Stage 1 (main process): takes and MIDI. Generation is a batch per track.
        midi_paths: dict[str, Path] = {}
        for track in pending:
            rep = by_name[track.name]
            start = time.perf_counter()
            try:
                midi_paths[track.name] = self._take_and_midi(track, plans[track.name], lock, rep)
                rep.seconds += time.perf_counter() - start
            except ChiptuneError as exc:
                rep.status, rep.error = "failed", str(exc)
        if not self.check:
            write_json(self.lock_path, lock)

        # Stage 2 (workers): render what changed.
        ok = [t for t in pending if by_name[t.name].status == "pending"]
        to_render = [t for t in ok if plans[t.name]["render"]]
        jobs = {t.name: RenderJob(t.name, str(midi_paths[t.name]), plans[t.name]["preset"],
                                  self.m.project.sample_rate, t.loop, t.intro_bars, t.bars,
                                  str(self.cache / "audio" / f"{plans[t.name]['render_key']}.npz"))
                for t in to_render}
        metas = self._run_stage(render_job, jobs, "render", by_name)
        for name, meta in metas.items():
            if meta.get("clip_warning"):
                self.log(f"{name}: warning: {meta['clip_warning']}")

        # Stage 3 (workers): export, with one shared gain when asked.
        ok = [t for t in pending if by_name[t.name].status == "pending"]
        for t in ok:
            if t.name not in metas:
                metas[t.name] = state["tracks"].get(t.name, {}).get("audio_meta") or \
                    load_track_audio(str(self.cache / "audio" / f"{plans[t.name]['render_key']}.npz"))[1]
        shared_gain = self._shared_gain(state, metas, plans, by_name) if self.m.project.same_gain else None
        p = self.m.project
        export_jobs = {}
        for t in ok:
            plan = plans[t.name]
            if lock_only(plan):
                continue
            sidecar = {"manifest": self.m.path.name,
                       "midi_sha256": sha256_file(midi_paths[t.name]), "tempo": t.tempo if t.midi is None else None,
                       "preset": self.m.preset_for(t), "source": str(t.midi.relative_to(self.root))
                       if t.midi and t.midi.is_relative_to(self.root) else (str(t.midi) if t.midi else "generated")}
            export_jobs[t.name] = ExportJob(t.name, str(self.cache / "audio" / f"{plan['render_key']}.npz"),
                                            str(p.output_dir), self.m.formats_for(t), p.loudness_lufs,
                                            p.true_peak_db, shared_gain, p.godot_import, p.split, sidecar)
        # Without build state (a fresh clone), what an earlier export wrote is known from its sidecar.
        others = self._others_files() if export_jobs else set()
        earlier = {name: [f for f in dict.fromkeys(self._deletable(state["tracks"].get(name, {}))
                                                   + self._sidecar_files(name)) if f not in others]
                   for name in export_jobs}
        from .export import sidecar_listed

        for name in list(export_jobs):  # NAME.json beside the audio: only ever our own sidecar is replaced
            sidecar = self.m.project.output_dir / f"{name}.json"
            if sidecar.exists() and not sidecar_listed(sidecar.parent, name):
                del export_jobs[name]
                by_name[name].status = "failed"
                by_name[name].error = (f"{sidecar}: exists and is not a sidecar chiptune-forge wrote for track "
                                       f"{name!r}; move it away or rename the track")
        results = self._run_stage(export_job, export_jobs, "export", by_name)

        # Record what now exists (per track, so a failure elsewhere never loses finished work).
        for t in pending:
            rep = by_name[t.name]
            if rep.status != "pending":
                continue
            plan = plans[t.name]
            if t.name not in export_jobs:
                rep.status, rep.files = "built", self._recorded_files(state["tracks"].get(t.name, {}))
                continue
            files = results[t.name]["files"]
            for stale in set(earlier[t.name]) - set(files):
                Path(stale).unlink(missing_ok=True)
            # Paths relative to the project: a moved or copied project finds its own files.
            state["tracks"][t.name] = {
                "gen_inputs": plan.get("gen_inputs"), "render_key": plan["render_key"],
                "render_inputs": plan["render_inputs"], "export_inputs": plan["export_inputs"],
                "audio_meta": metas[t.name], "gain_db": results[t.name]["gain_db"],
                "files": [os.path.relpath(f, self.root) for f in files],
                "file_stamps": {os.path.relpath(f, self.root): _file_stamp(f) for f in files},
                "take_sha256": _take_digest(lock["tracks"][t.name]) if t.midi is None else None}
            rep.status, rep.files = "built", files
        self._prune(state)
        write_json(self.state_path, state)

    def _run_stage(self, fn: Callable, jobs: dict[str, Any], stage: str,
                   reports: dict[str, TrackReport]) -> dict[str, dict[str, Any]]:
        """Run one stage's jobs; record each track's outcome and time in its report."""
        results = {}
        for name, result, error in self._map(fn, jobs, stage):
            if error:
                reports[name].status, reports[name].error = "failed", error
            else:
                results[name] = result
                reports[name].stages.append(stage)
                reports[name].seconds += result["seconds"]
        return results

    def _take_and_midi(self, track: TrackSpec, plan: dict[str, Any], lock: dict, rep: TrackReport) -> Path:
        midi_path = self.cache / "midi" / f"{track.name}-{plan['midi_key'][:16]}.mid"
        if track.midi is not None:
            data = midi_from_file(track, self.m.path, self.m.project.sample_rate, self.log)
            if sha256_file(track.midi) != plan["midi_inputs"]["midi_file"]:
                raise ChiptuneError(f"{track.midi}: changed while the build was running; build again")
        else:
            events, index = self._take(track, plan, lock, rep)
            try:
                data = midi_from_events(events, track)
            except ValueError as exc:  # a take edited by hand into events that are not music
                raise ChiptuneError(f"{self.lock_path}: the take locked for track {track.name!r} is damaged ({exc}); "
                                    f"run with '--regenerate {track.name}' to take a new one") from None
            played = {"midi_sha256": sha256_bytes(data), "tempo": track.tempo, "transpose": track.transpose}
            if lock_only(plan):
                rep.stages.append("lock")
            if plan["take"] == "lock":  # the take and where it came from stay as locked
                entry = lock["tracks"][track.name]
                if (entry.get("tempo"), entry.get("transpose")) == (track.tempo, track.transpose) and \
                        entry["midi_sha256"] != played["midi_sha256"]:
                    self.log(f"{track.name}: warning: the take locked for it does not match the MIDI hash "
                             f"recorded with it (edited by hand, or merged?); building the take as locked")
                lock["tracks"][track.name] = entry | played
            else:
                lock["tracks"][track.name] = {
                    "candidate": index, "generation": plan["gen_key"], "inputs_sha256": plan["lock_key"],
                    "model_sha256": self.model.fingerprint, **played,
                    "events": base64.b64encode(events.astype("<i2").tobytes()).decode()}
        if not midi_path.is_file() or midi_path.read_bytes() != data:
            write_atomic(midi_path, data)
        for old in (self.cache / "midi").glob(f"{track.name}-*.mid"):
            if old != midi_path:
                old.unlink(missing_ok=True)
        return midi_path

    def _take(self, track: TrackSpec, plan: dict[str, Any], lock: dict, rep: TrackReport) -> tuple[np.ndarray, int]:
        """The chosen candidate's events: from the lock, the generation cache, or a new generation."""
        if plan["take"] == "lock":
            entry = lock["tracks"][track.name]
            try:
                events = np.frombuffer(base64.b64decode(entry["events"], validate=True), dtype="<i2")
                return events.astype(np.int16), int(entry["candidate"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ChiptuneError(f"{self.lock_path}: the take locked for track {track.name!r} is damaged "
                                    f"({exc}); run with '--regenerate {track.name}' to take a new one") from None
        gen_path = self.cache / "gen" / f"{plan['gen_key']}.npz"
        if plan["take"] == "cache":
            try:
                return _pick(gen_path, track)
            except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile):
                # The cache is only a copy of what the model makes again from the same inputs.
                self.log(f"{track.name}: the generation cache {gen_path.name} is damaged; generating again")
        self._generate(track, gen_path)
        rep.stages.append("generate")
        return _pick(gen_path, track)

    def _generate(self, track: TrackSpec, gen_path: Path) -> None:
        from .generate import GenerationRequest, generate, rank

        request = GenerationRequest(
            num_outputs=track.candidates, bars=track.intro_bars + track.bars,
            primer_melody=list(track.primer_melody) if track.primer_melody else None,
            primer_pitches=list(track.primer_pitches) if track.primer_pitches else None,
            primer_midi=track.primer_midi, temperature=track.temperature, max_polyphony=MAX_POLYPHONY,
            qpm=track.tempo, seed=track.seed)
        self.log(f"{track.name}: generating {track.candidates} candidates "
                 f"({track.intro_bars + track.bars} bars) with model {self.model.dir}")
        at = track.at(self.m.path, "primer_midi")
        pieces = generate(self.model.load(), request, warn=lambda message: self.log(f"{at}warning: {message}"))
        ranking = [p.index for p in rank(pieces)]
        offsets = np.concatenate([[0], np.cumsum([len(p.events) for p in pieces])]).astype(np.int64)
        scores = [p.scores for p in pieces]
        tmp = gen_path.with_name(gen_path.name + ".partial")
        with open(tmp, "wb") as fh:
            np.savez(fh, events=np.concatenate([p.events for p in pieces]).astype(np.int16), offsets=offsets,
                     ranking=json.dumps(ranking), scores=json.dumps(scores, default=float))
        os.replace(tmp, gen_path)

    def _shared_gain(self, state: dict, metas: dict[str, dict], plans: dict,
                     reports: dict[str, TrackReport]) -> float:
        """One gain for the whole soundtrack: the loudest track meets the target, and no track's files pass
        the true-peak ceiling (each track's headroom is measured through the codec once and kept in its
        audio meta, per formats and ceiling)."""
        p = self.m.project
        levels: dict[str, dict] = {}
        paths: dict[str, str] = {}
        for t in self.m.tracks:
            if t.name in metas:  # rendered now, or about to be exported from the audio cache
                meta, key = metas[t.name], plans[t.name]["render_key"]
            elif t.name in reports and reports[t.name].status == "failed":
                continue  # its audio is not what the state remembers any more
            else:  # not in this build (--only): as last built
                old = state["tracks"].get(t.name, {})
                meta, key = old.get("audio_meta"), old.get("render_key")
            if meta and key:
                levels[t.name] = metas.setdefault(t.name, meta)
                paths[t.name] = str(self.cache / "audio" / f"{key}.npz")
        if not levels:
            return 0.0
        wanted = {name: (tuple(self.m.formats_for(self.m.track(name))), p.true_peak_db) for name in levels}
        tags = {name: f"{','.join(fmts)}@{ceiling:g}" for name, (fmts, ceiling) in wanted.items()}
        jobs = {name: HeadroomJob(paths[name], *wanted[name]) for name, meta in levels.items()
                if name in reports and tags[name] not in meta.get("headroom_db", {})}
        for name, result in self._run_stage(headroom_job, jobs, "headroom", reports).items():
            levels[name].setdefault("headroom_db", {})[tags[name]] = result["headroom_db"]
        headroom = min((m["headroom_db"][tags[n]] for n, m in levels.items() if tags[n] in m.get("headroom_db", {})),
                       default=math.inf)
        loudest = max(m["loudness_lufs"] for m in levels.values())
        gain = min(p.loudness_lufs - loudest, headroom)
        return 0.0 if math.isinf(gain) else gain

    def _map(self, fn: Callable, jobs: dict[str, Any], what: str) -> Iterator[tuple[str, Any, str | None]]:
        """Run jobs in worker processes with a progress bar; errors come back per track, never raised."""
        from .progress import bar

        if not jobs:
            return
        own = self.executor is None and len(jobs) > 1 and self.workers > 1
        executor = self.executor or (new_executor(min(self.workers, len(jobs))) if own else None)
        try:
            with bar(len(jobs), what, unit="track", disable=not self.show_progress) as progress:
                if executor is None:
                    for name, job in jobs.items():
                        yield (name, *_call(fn, job))
                        progress.update()
                else:
                    futures: dict[str, Future] = {}
                    for name, job in jobs.items():
                        try:
                            futures[name] = executor.submit(_call, fn, job)
                        except BrokenProcessPool:  # a worker died earlier: the pool takes no more work
                            self.workers_lost = True
                            break
                    for name in jobs:
                        try:
                            result = futures[name].result() if name in futures else \
                                (None, f"{what} worker pool is broken (a worker process died)")
                        except Exception as exc:  # a worker that died (crashing plugin, killed process)
                            self.workers_lost |= isinstance(exc, BrokenProcessPool)
                            result = (None, f"{what} worker failed: {type(exc).__name__}: {exc}")
                        yield (name, *result)
                        progress.update()
        except BaseException:  # Ctrl-C or an error here: stop the workers now rather than wait for them
            if own:
                stop_workers(executor)
                own = False
                self._clean_partials()  # what the stopped workers were writing
            raise
        finally:
            if own:
                executor.shutdown(wait=True, cancel_futures=True)

    def _clean_partials(self) -> None:
        """Remove temporary files left by a build that was stopped or killed mid-write (only while this
        build holds the project's build lock, so none of them is being written)."""
        for folder in (self.m.project.output_dir, self.cache, self.cache / "audio", self.cache / "gen",
                       self.cache / "midi"):
            if folder.is_dir():
                for f in folder.glob("*.partial"):
                    f.unlink(missing_ok=True)
                for f in folder.glob(".*.partial"):
                    f.unlink(missing_ok=True)
        for f in self.root.glob(f".{glob.escape(self.lock_path.name)}.*.partial"):  # the lock's, beside the manifest
            f.unlink(missing_ok=True)

    def _recorded_files(self, entry: dict) -> list[str]:
        """A state entry's asset files as absolute paths (recorded relative to the project folder; older
        builds recorded absolute ones)."""
        return [str(self.root / f) for f in entry.get("files", [])]

    def _owns(self, file: str) -> bool:
        """Whether an asset file is in this project's output folder."""
        return Path(file).parent == self.m.project.output_dir

    def _deletable(self, entry: dict) -> list[str]:
        """The files a state entry records that this build may delete: asset files (by suffix) in the output
        folder, or in the one the entry's export used; an older state's absolute paths only in the output
        folder (such a state may have been shared with another manifest, or copied from another project)."""
        folders = {self.m.project.output_dir}
        recorded_dir = (entry.get("export_inputs") or {}).get("output_dir")
        if isinstance(recorded_dir, str) and not Path(recorded_dir).is_absolute():
            folders.add(Path(os.path.normpath(self.root / recorded_dir)))  # where it exported then
        files = []
        for recorded in entry.get("files", []):
            path = Path(os.path.normpath(self.root / recorded))
            allowed = {self.m.project.output_dir} if Path(recorded).is_absolute() else folders
            if (path.parent in allowed and path.is_relative_to(self.root)
                    and CACHE_DIR not in path.relative_to(self.root).parts and path.suffix.lower() in ASSET_SUFFIXES):
                files.append(str(path))
        return files

    def _removed(self, state: dict, lock: dict) -> list[str]:
        """Tracks the last build or the lock knows that the manifest no longer has (with the old names of
        renamed tracks, whose takes moved to their new names)."""
        if self.only:  # a partial build leaves the rest of the soundtrack as it is
            return []
        names = {t.name for t in self.m.tracks}
        gone = (set(state["tracks"]) | set(lock["tracks"]) | set(self._renamed_away.values())) - names
        return sorted(name for name in gone if not self._left_to_neighbour(name, state["tracks"].get(name)))

    def _left_to_neighbour(self, name: str, entry: dict | None) -> bool:
        """Whether a track gone from this manifest is another's now: a manifest beside it with no build state
        (not built yet, or built by an earlier version, which kept one state for all) has a track of that
        name exporting into the same folder. Its files are that build's to replace."""
        recorded = (entry or {}).get("export_inputs") or {}
        folder = recorded.get("output_dir") if isinstance(recorded.get("output_dir"), str) else None
        ours = Path(os.path.normpath(self.root / folder)) if folder else self.m.project.output_dir
        return any(name in n.tracks and not n.state_path.exists() and n.output_dir == ours for n in self.neighbours)

    def _others_files(self) -> set[str]:
        """Asset files that another manifest's build state in the folder records for a track it still has:
        never this build's to delete (read once per build)."""
        if self._others is None:
            self._others = set()
            for n in self.neighbours:
                data = read_json(n.state_path, {})
                tracks = data.get("tracks") if isinstance(data, dict) else None
                for name, entry in (tracks if isinstance(tracks, dict) else {}).items():
                    if name in n.tracks and _state_entry_sound(entry):
                        self._others |= {os.path.normpath(self.root / f) for f in entry.get("files", [])}
        return self._others

    def _drop_removed(self, report: BuildReport) -> None:
        """Delete the assets this tool wrote for tracks no longer in the manifest (a renamed track would
        otherwise leave its old file in the game's music folder) and forget their state and lock entries.

        Without build state (a fresh clone: .chiptune/ is not committed) a removed track is known from the
        lock, and its files from the sidecar JSON the export wrote beside them."""
        state, lock = self._state(), self._lock()
        removed = self._removed(state, lock)
        if not removed:
            return
        others = self._others_files()
        for name in removed:
            entry = state["tracks"].pop(name, None)
            files = self._deletable(entry) if entry is not None else self._sidecar_files(name)
            files = [f for f in files if f not in others]
            for f in files:
                Path(f).unlink(missing_ok=True)
            lock["tracks"].pop(name, None)
            report.tracks.append(TrackReport(name, "removed", reasons=["removed from the manifest"], files=files))
        self._prune(state)
        write_json(self.state_path, state)
        write_json(self.lock_path, lock)

    def _sidecar_files(self, name: str) -> list[str]:
        """The files NAME.json (written by our export) lists for the track, with itself and any Godot
        .import files beside them; nothing if there is no such sidecar of ours."""
        from .export import sidecar_listed

        out = self.m.project.output_dir
        sidecar = out / f"{name}.json"
        listed = sidecar_listed(out, name, {n.path.name for n in self.neighbours if name in n.tracks})
        if not listed:
            return []
        files = [out / f for f in listed if Path(f).suffix.lower() in ASSET_SUFFIXES]
        files += [godot_import_file(f) for f in files]
        return [str(f) for f in [*files, sidecar] if f.is_file()]

    def _prune(self, state: dict) -> None:
        """Keep only the audio cache entries that this state or another manifest's in the folder points to."""
        live = {s.get("render_key") for s in state["tracks"].values()}
        for n in self.neighbours:
            data = read_json(n.state_path, {})
            tracks = data.get("tracks") if isinstance(data, dict) else None
            if isinstance(tracks, dict):
                live |= {t.get("render_key") for t in tracks.values() if _state_entry_sound(t)}
        for f in (self.cache / "audio").glob("*.npz"):
            if f.stem not in live:
                f.unlink(missing_ok=True)


def _call(fn: Callable, job: Any) -> tuple[Any, str | None]:
    """Run a stage; user errors and unexpected failures become a message for that track only."""
    try:
        return fn(job), None
    except ChiptuneError as exc:
        return None, str(exc)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def build(manifest: str | Path = "chiptune.toml", *, only: list[str] | None = None, force: bool = False,
          regenerate: list[str] | None = None, check: bool = False, show_progress: bool = False,
          log: Callable[[str], None] | None = None) -> BuildReport:
    """Build a soundtrack from its manifest (the Python API of `chiptune-forge build`)."""
    builder = Builder(load_manifest(manifest), only=only, force=force, regenerate=regenerate, check=check,
                      show_progress=show_progress, log=log)
    return builder.run()
