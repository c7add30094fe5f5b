"""`chiptune.toml`: the soundtrack manifest, its schema, and validation that reports every problem at once.

Each problem names the file, the line and the key (`chiptune.toml:12: track 'battle': tempo: ...`), and
nothing is built until the whole manifest is valid.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ChiptuneError, UsageError, did_you_mean
from .export import FORMATS, TARGET_LUFS, TRUE_PEAK_DB, loudness_problem, true_peak_problem
from .loops import SAMPLE_RATES, SPLIT_PARTS, split_clip

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CACHE_DIR = ".chiptune"
"""The build cache's folder beside the manifest."""
MAX_BARS = 512
MAX_CANDIDATES = 256
MANIFEST_NAME = "chiptune.toml"
LOCK_NAME = "chiptune.lock"
GENERATION_KEYS = ("seed", "temperature", "primer_pitches", "primer_melody", "primer_midi", "candidates", "pick",
                   "tempo")


class ManifestError(UsageError):
    """Every problem found in a manifest, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class ProjectSettings:
    output_dir: Path
    model: str = "default"
    preset: str = "snes"
    formats: tuple[str, ...] = ("ogg",)
    sample_rate: int = 44100
    loudness_lufs: float = TARGET_LUFS
    true_peak_db: float = TRUE_PEAK_DB
    same_gain: bool = False
    godot_import: bool = False
    split: bool = False


@dataclass(frozen=True)
class TrackSpec:
    """One asset to produce: generated from the model, or rendered from a given MIDI file."""

    name: str
    line: int
    bars: int | None = 8  # None: a `midi` track's body runs to the piece's last bar line
    intro_bars: int = 0
    tempo: float = 120.0
    transpose: int = 0
    seed: int = 0
    temperature: float = 1.0
    primer_pitches: tuple[int, ...] | None = None
    primer_melody: tuple[int, ...] | None = None
    primer_midi: Path | None = None
    candidates: int = 4
    pick: str | int = "best"
    preset: str | None = None
    formats: tuple[str, ...] | None = None
    loop: bool = True
    midi: Path | None = None
    key_lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def at(self, manifest: Path, key: str) -> str:
        """Where one of this track's keys is written, as the start of a problem found while building:
        `FILE:LINE: track 'NAME': KEY: ` (the [[track]] header's line when the key is left out)."""
        return f"{manifest}:{self.key_lines.get(key, self.line)}: track {self.name!r}: {key}: "


@dataclass
class Manifest:
    path: Path
    project: ProjectSettings
    tracks: list[TrackSpec] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.path.parent

    def track(self, name: str) -> TrackSpec:
        for t in self.tracks:
            if t.name == name:
                return t
        raise UsageError(f"{self.path}: no track named {name!r} (tracks: {', '.join(t.name for t in self.tracks)})")

    def preset_for(self, track: TrackSpec) -> str:
        return track.preset or self.project.preset

    def formats_for(self, track: TrackSpec) -> tuple[str, ...]:
        return track.formats or self.project.formats


# Key -> (type check, description) for the schema; checked in order, all problems collected.
PROJECT_KEYS = {
    "output_dir": (str, "a folder path"), "model": (str, "'default', a model folder or a run folder"),
    "preset": (str, "a preset name or path"), "formats": (list, "a list like [\"ogg\", \"wav\"]"),
    "sample_rate": (int, "32000, 44100 or 48000"), "loudness_lufs": ((int, float), "a number (LUFS)"),
    "true_peak_db": ((int, float), "a number (dBTP)"), "same_gain": (bool, "true or false"),
    "godot_import": (bool, "true or false"), "split": (bool, "true or false"),
}
TRACK_KEYS = {
    "name": (str, "a file stem"), "bars": (int, "a whole number of bars"),
    "intro_bars": (int, "a whole number of bars"), "tempo": ((int, float), "quarter notes per minute"),
    "transpose": (int, "semitones"), "seed": (int, "a whole number"), "temperature": ((int, float), "a number > 0"),
    "primer_pitches": (list, "a list of MIDI pitches"), "primer_melody": (list, "a list of pitches, -1 and -2"),
    "primer_midi": (str, "a MIDI file path"), "candidates": (int, "how many pieces to generate"),
    "pick": ((str, int), "\"best\" or a candidate index"), "preset": (str, "a preset name or path"),
    "formats": (list, "a list like [\"ogg\"]"), "loop": (bool, "true or false"), "midi": (str, "a MIDI file path"),
}


class _Lines:
    """Where each key sits in the file: tomllib gives values but no positions, so scan the text."""

    header = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"']+)\s*\]\]?")
    key = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")

    def __init__(self, text: str) -> None:
        self.tables: dict[tuple[str, int], int] = {}
        self.keys: dict[tuple[str, int, str], int] = {}
        counts: dict[str, int] = {}
        table, index = "", 0
        for number, line in enumerate(text.splitlines(), start=1):
            m = self.header.match(line)
            if m:
                table = m.group(2).strip("\"'")
                index = counts.get(table, -1) + 1 if m.group(1) == "[[" else 0
                counts[table] = index
                self.tables[(table, index)] = number
                continue
            k = self.key.match(line)
            if k:
                self.keys.setdefault((table, index, k.group(1).strip("\"'")), number)

    def find(self, table: str, index: int, key: str | None = None) -> int | None:
        """The line of the key, else of its table (header, or key of an inline table); None if the scan
        saw neither (a dotted or quoted key, a table made only by its subtables)."""
        if key is not None and (table, index, key) in self.keys:
            return self.keys[(table, index, key)]
        if (table, index) in self.tables:
            return self.tables[(table, index)]
        parent, _, name = table.rpartition(".")
        return self.keys.get((parent, 0, name))  # an inline table: the line of its key in the table around it

    def of(self, table: str, index: int, key: str | None = None) -> int:
        found = self.find(table, index, key)
        if found is not None:
            return found
        # a table made only by its subtables' headers ([tracks.boss] makes [tracks]): the first of those
        return min((line for (header, _), line in self.tables.items() if header.startswith(f"{table}.")), default=1)


def manifest_file(path: str | Path) -> Path:
    """The manifest a command-line argument names: the file itself, or chiptune.toml in that folder."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


def lock_and_state(manifest_path: Path) -> tuple[Path, Path]:
    """The lock and build state of a manifest. chiptune.toml has chiptune.lock and .chiptune/state.json;
    another manifest in the same folder (NAME.toml) has its own NAME.lock and .chiptune/state-NAME.json, so
    neither takes the other's tracks for removed ones."""
    root, cache = manifest_path.parent, manifest_path.parent / CACHE_DIR
    if manifest_path.name == MANIFEST_NAME:
        return root / LOCK_NAME, cache / "state.json"
    return root / f"{manifest_path.stem}.lock", cache / f"state-{manifest_path.stem}.json"


@dataclass(frozen=True)
class Neighbour:
    """Another manifest in the project folder, read leniently (any .toml there: a preset has no tracks)."""

    path: Path
    tracks: frozenset[str]
    output_dir: Path | None

    @classmethod
    def read(cls, path: Path) -> Neighbour:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            data = {}
        tracks, project = data.get("track"), data.get("project", {})
        names = {t["name"] for t in tracks if isinstance(t, dict) and isinstance(t.get("name"), str)} \
            if isinstance(tracks, list) else set()
        folder = project.get("output_dir", "music") if isinstance(project, dict) else None
        return cls(path, frozenset(names),
                   Path(os.path.normpath(path.parent / folder)) if isinstance(folder, str) else None)

    @property
    def state_path(self) -> Path:
        return lock_and_state(self.path)[1]


def neighbours(manifest_path: Path) -> list[Neighbour]:
    """The other manifests with tracks in a manifest's folder."""
    return [n for m in sorted(manifest_path.parent.glob("*.toml")) if m != manifest_path
            and (n := Neighbour.read(m)).tracks]


def not_found(path: Path) -> str:
    """The message for a missing manifest: the manifests beside it when a folder was given, else how to
    make one."""
    others = [n.path.name for n in neighbours(path)] if path.name == MANIFEST_NAME else []
    if others:
        return f"{path}: manifest not found; the folder has {', '.join(others)}: give its path"
    return f"{path}: manifest not found (create one with 'chiptune-forge init')"


def load_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Parse and validate a manifest; raise ManifestError listing every problem."""
    path = manifest_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # editors on Windows may add a byte-order mark
    except FileNotFoundError:
        raise UsageError(not_found(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read manifest ({exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError([toml_syntax_error(path, exc)]) from None
    return _validate(path.resolve(), data, _Lines(text), check_files)


def toml_syntax_error(path: object, exc: tomllib.TOMLDecodeError) -> str:
    """FILE:LINE:COLUMN: TOML syntax error: what (tomllib gives the position only inside its message)."""
    msg = str(exc)
    m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
    if m:
        return f"{path}:{m.group(1)}:{m.group(2)}: TOML syntax error: {msg[: m.start()].strip()}"
    return f"{path}: TOML syntax error: {msg}"


def _validate(path: Path, data: dict[str, Any], lines: _Lines, check_files: bool) -> Manifest:
    problems: list[str] = []

    def problem(line: int, where: str, message: str) -> None:
        problems.append(f"{path}:{line}: {where}{message}")

    for key in data:
        value = data[key]
        table = isinstance(value, dict) or (isinstance(value, list) and bool(value)
                                            and all(isinstance(v, dict) for v in value))
        if key not in ("project", "track") and not table:
            where = "[project]" if key in PROJECT_KEYS else "a [[track]]" if key in TRACK_KEYS else None
            hint = (f" (did you mean to put it under {where}?)" if where
                    else did_you_mean(key, sorted(set(PROJECT_KEYS) | set(TRACK_KEYS))))
            problem(lines.of("", 0, key), "", f"{key}: a key outside any table{hint}")
        elif key not in ("project", "track"):
            hint = did_you_mean(key, ["project", "track"])
            problem(lines.of(key, 0), "", f"unknown table [{key}]{hint}")
    raw_project = data.get("project", {})
    if not isinstance(raw_project, dict):
        problem(1, "", "[project] must be a table")
        raw_project = {}
    project_values = _check_table(raw_project, PROJECT_KEYS, lambda k: lines.of("project", 0, k), "[project] ",
                                  problem, (TRACK_KEYS, "per-track ([[track]])"))
    root = path.parent
    output_dir = (root / project_values.get("output_dir", "music")).resolve()
    if not _inside(output_dir, root):
        problem(lines.of("project", 0, "output_dir"), "[project] ",
                f"output_dir: {project_values.get('output_dir')!r} leaves the project folder {root}")
    if output_dir == root:
        problem(lines.of("project", 0, "output_dir"), "[project] ",
                "output_dir: must be a subfolder, not the manifest's own folder")
    elif output_dir.exists() and not output_dir.is_dir():
        problem(lines.of("project", 0, "output_dir"), "[project] ", f"output_dir: {output_dir} is a file, not a folder")
    elif output_dir.name == CACHE_DIR:
        problem(lines.of("project", 0, "output_dir"), "[project] ",
                f"output_dir: {CACHE_DIR} is the build cache's folder; choose another")
    _check_choice(project_values, "sample_rate", SAMPLE_RATES, lambda k: lines.of("project", 0, k), "[project] ",
                  problem)
    formats = _check_formats(project_values.get("formats", ["ogg"]), lambda: lines.of("project", 0, "formats"),
                             "[project] ", problem)
    model = project_values.get("model", "default")
    if check_files and isinstance(model, str):
        from .lstm import WEIGHTS_NPZ, resolve_model_dir

        model_path = (root / model).expanduser()
        if model != "default" and not model_path.exists():
            problem(lines.of("project", 0, "model"), "[project] ", f"model: {model!r} not found ({model_path})")
        else:
            try:
                folder = resolve_model_dir(None if model == "default" else model_path)
                if not (folder / WEIGHTS_NPZ).is_file():
                    raise ChiptuneError(f"{folder} has no {WEIGHTS_NPZ} (the model has no weights)")
            except ChiptuneError as exc:
                problem(lines.of("project", 0, "model"), "[project] ", f"model: {exc}")
    preset = project_values.get("preset", "snes")
    if check_files:
        _check_preset(preset, root, lambda: lines.of("project", 0, "preset"), "[project] ", problem)
    settings = ProjectSettings(
        output_dir=output_dir, model=model if model == "default" else str((root / model).expanduser()),
        preset=preset, formats=formats,
        sample_rate=int(project_values.get("sample_rate", 44100)),
        loudness_lufs=float(project_values.get("loudness_lufs", TARGET_LUFS)),
        true_peak_db=float(project_values.get("true_peak_db", TRUE_PEAK_DB)),
        same_gain=bool(project_values.get("same_gain", False)),
        godot_import=bool(project_values.get("godot_import", False)),
        split=bool(project_values.get("split", False)))
    for key, reason in (("true_peak_db", true_peak_problem(settings.true_peak_db)),
                        ("loudness_lufs", loudness_problem(settings.loudness_lufs))):
        if reason:
            problem(lines.of("project", 0, key), "[project] ", f"{key}: {reason}")

    raw_tracks = data.get("track", [])
    if not isinstance(raw_tracks, list) or not all(isinstance(t, dict) for t in raw_tracks):
        problem(lines.of("", 0, "track"), "", f"track: expected [[track]] tables, got {raw_tracks!r}")
        raw_tracks = []
    elif not raw_tracks:
        problem(1, "", "no [[track]] tables: add at least one track")
    tracks: list[TrackSpec] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_tracks):
        track = _validate_track(raw, index, root, lines, check_files, problem)
        if track is None:
            continue
        folded = track.name.casefold()
        if folded in seen:
            problem(track.line, f"track {track.name!r}: ", f"name: duplicate of the track at line {seen[folded]}"
                    + ("" if any(t.name == track.name for t in tracks) else " (names differ only in case, "
                       "which is the same file on Windows and macOS)"))
        seen.setdefault(folded, track.line)
        tracks.append(track)
    if settings.split:  # the split clips NAME_intro and NAME_loop must not be another track's asset
        clips: dict[str, TrackSpec] = {}
        for t in tracks:
            for part in SPLIT_PARTS if t.loop else ():
                clips.setdefault(split_clip(t.name, part).casefold(), t)
        for track in tracks:
            owner = clips.get(track.name.casefold())
            if owner is not None:
                problem(track.line, f"track {track.name!r}: ",
                        f"name: the same file as track {owner.name!r}'s split clip (split = true)")
    if problems:
        prefix = len(f"{path}:")
        raise ManifestError(sorted(problems, key=lambda p: int(p[prefix:].split(":", 1)[0])))
    return Manifest(path, settings, tracks)


def _validate_track(raw: dict[str, Any], index: int, root: Path, lines: _Lines, check_files: bool,
                    problem) -> TrackSpec | None:
    line = lines.of("track", index)
    name = raw.get("name") if isinstance(raw.get("name"), str) else None
    label = f"track {name!r}: " if name else f"track #{index + 1}: "
    values = _check_table(raw, TRACK_KEYS, lambda k: lines.of("track", index, k), label, problem,
                          (PROJECT_KEYS, "[project]"))

    def at(key: str) -> int:
        return lines.of("track", index, key)

    if name is None:
        if "name" not in raw:
            problem(line, label, "name: missing (the asset's file stem, e.g. name = \"title\")")
        return None
    if not NAME_PATTERN.match(name):
        problem(at("name"), label, "name: use letters, digits, '_', '-' and '.' only, not starting with '.' "
                                   "(it becomes a file name)")
    for key, low, high in (("bars", 1, MAX_BARS), ("intro_bars", 0, MAX_BARS), ("candidates", 1, MAX_CANDIDATES)):
        if key in values and not low <= values[key] <= high:
            problem(at(key), label, f"{key}: must be within {low}..{high}, got {values[key]}")
    if values.get("intro_bars", 0) > 0 and values.get("loop") is False:
        problem(at("intro_bars"), label, "intro_bars: a jingle (loop = false) has no intro; remove one of them")
    if "tempo" in values and not 20 <= values["tempo"] <= 400:
        problem(at("tempo"), label, f"tempo: {values['tempo']} qpm is outside 20..400")
    if "temperature" in values and not 0 < values["temperature"] < math.inf:
        problem(at("temperature"), label,
                f"temperature: must be a finite number greater than 0, got {values['temperature']}")
    if "transpose" in values and not -24 <= values["transpose"] <= 24:
        problem(at("transpose"), label, "transpose: must be within -24..24 semitones")
    primers = [k for k in ("primer_pitches", "primer_melody", "primer_midi") if k in values]
    if len(primers) > 1:
        problem(at(primers[1]), label, f"{primers[1]}: give only one primer (also has {primers[0]})")
    for key, low in (("primer_pitches", 0), ("primer_melody", -2)):
        for v in values.get(key, []):
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= 127:
                problem(at(key), label, f"{key}: {v!r} is not a pitch in {low}..127")
    pick = values.get("pick", "best")
    candidates = values.get("candidates", 4)
    if isinstance(pick, str) and pick != "best":
        problem(at("pick"), label, f"pick: expected \"best\" or an index, got {pick!r}")
    if isinstance(pick, int) and not 0 <= pick < candidates:
        problem(at("pick"), label, f"pick: index {pick} is outside 0..{candidates - 1} (candidates = {candidates})")
    midi = primer_midi = None
    if "midi" in values:
        for key in GENERATION_KEYS:
            if key in values:
                problem(at(key), label, f"{key}: has no effect on a track rendered from 'midi'")
        midi = _resolve_file(values["midi"], root, check_files, at("midi"), label, "midi", problem)
    if "primer_midi" in values:
        primer_midi = _resolve_file(values["primer_midi"], root, check_files, at("primer_midi"), label,
                                    "primer_midi", problem)
    preset = values.get("preset")
    if preset is not None and check_files:
        _check_preset(preset, root, lambda: at("preset"), label, problem)
    formats = None
    if "formats" in values:
        formats = _check_formats(values["formats"], lambda: at("formats"), label, problem)
    return TrackSpec(
        name=name, line=line, bars=int(values["bars"]) if "bars" in values else (None if midi else 8),
        intro_bars=int(values.get("intro_bars", 0)),
        tempo=float(values.get("tempo", 120.0)), transpose=int(values.get("transpose", 0)),
        seed=int(values.get("seed", 0)), temperature=float(values.get("temperature", 1.0)),
        primer_pitches=tuple(values["primer_pitches"]) if "primer_pitches" in values else None,
        primer_melody=tuple(values["primer_melody"]) if "primer_melody" in values else None,
        primer_midi=primer_midi, candidates=int(candidates), pick=pick, preset=preset, formats=formats,
        loop=bool(values.get("loop", True)), midi=midi, key_lines={key: at(key) for key in raw})


def _check_table(raw: dict[str, Any], schema: dict[str, tuple[Any, str]], line_of, label: str,
                 problem, elsewhere: tuple[dict[str, Any], str] | None = None) -> dict[str, Any]:
    """Unknown keys (with a did-you-mean, or the table they belong in: `elsewhere` is another table's
    schema and name) and wrong types; returns the well-typed values only."""
    good: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in schema:
            if elsewhere is not None and key in elsewhere[0] and key != "name":
                problem(line_of(key), label, f"{key} is a {elsewhere[1]} setting; move it there")
            else:
                problem(line_of(key), label, f"unknown key {key!r}{did_you_mean(key, list(schema))}")
            continue
        types, description = schema[key]
        types = types if isinstance(types, tuple) else (types,)
        is_bool = isinstance(value, bool)
        if not isinstance(value, types) or (is_bool and bool not in types):
            problem(line_of(key), label, f"{key}: expected {description}, got {value!r}")
            continue
        good[key] = value
    return good


def _check_choice(values: dict[str, Any], key: str, choices: tuple, line_of, label: str, problem) -> None:
    if key in values and values[key] not in choices:
        problem(line_of(key), label, f"{key}: {values[key]} is not one of {', '.join(map(str, choices))}")


def _check_formats(value: list, line, label: str, problem) -> tuple[str, ...]:
    formats = []
    for item in value:
        if item not in FORMATS:
            problem(line(), label, f"formats: {item!r} is not one of {', '.join(FORMATS)}"
                    f"{did_you_mean(str(item), FORMATS)}")
        elif item not in formats:
            formats.append(item)
    if not value:
        problem(line(), label, "formats: give at least one format")
    return tuple(formats) or ("ogg",)


def _check_preset(preset: str, root: Path, line, label: str, problem) -> None:
    """A preset that does not parse makes the manifest invalid; one whose plugin is missing or cannot load
    here only fails the tracks that use it, when the build gets to them."""
    from .plugins import PluginUnavailable
    from .presets import load_preset

    try:
        load_preset(preset, base_dir=root)
    except PluginUnavailable:
        pass
    except ChiptuneError as exc:
        problem(line(), label, f"preset: {exc}")


def _resolve_file(value: str, root: Path, check: bool, line: int, label: str, key: str, problem) -> Path:
    p = (root / value).expanduser().resolve()
    if check and not p.is_file():
        problem(line, label, f"{key}: {'a folder, not a file' if p.is_dir() else 'file not found'}: {value}")
    return p


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


STARTER = '''\
# chiptune-forge soundtrack manifest. Build it with: chiptune-forge build
# Every key below is optional unless marked; paths are relative to this file.

[project]
output_dir = "music"          # where the game's audio assets are written
model = "default"             # "default" (shipped model), an exported model folder or a training run folder
preset = "snes"               # a shipped preset (chiptune-forge presets) or a path to a preset .toml
formats = ["ogg"]             # "ogg" (LOOPSTART/LOOPLENGTH tags) and/or "wav" (smpl loop chunk)
sample_rate = 44100           # 32000, 44100 or 48000
loudness_lufs = -16.0         # integrated loudness target of each track
true_peak_db = -1.0           # true-peak ceiling
same_gain = false             # true: one gain for every track, keeping their relative levels

[[track]]
name = "title"                # required: the asset's file stem (music/title.ogg)
bars = 8                      # length of the looping body in bars of 4/4
intro_bars = 2                # bars played once before the loop
tempo = 112                   # quarter notes per minute
seed = 1                      # change it for a different take
candidates = 4                # pieces generated; the best-scoring one is kept
pick = "best"                 # or an index 0..candidates-1
primer_pitches = [60, 64, 67] # optional start: a chord (or primer_melody / primer_midi)

[[track]]
name = "victory"
bars = 2
loop = false                  # a jingle: plays once and ends with its tail
tempo = 140
seed = 3
'''
