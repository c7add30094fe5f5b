"""A folder of MIDI files -> event sequences for training, in sharded .npz files, plus summary.json.

Unlike the reference pipeline, which throws away every piece longer than 512 steps, long pieces are cut
into bar-aligned windows so the music is kept. Shards hold one flat int16 event array and the offsets of
each sequence, which the training input pipeline loads without TensorFlow-specific formats.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .encoding import ENCODING_VERSION, NUM_CLASSES, encode
from .errors import ChiptuneError, MidiError, print_warning
from .midi import STEPS_PER_QUARTER, QuantizedPiece, read_midi, split_and_quantize
from .progress import progress
from .workers import new_executor, stop_workers

MIDI_SUFFIXES = {".mid", ".midi", ".smf", ".kar"}
SHARD_SEQUENCES = 4096
SPLITS = ("train", "eval")
_SHARD_NAME = re.compile(r"(train|eval)-\d{5}(-[0-9a-f]{8})?\.npz")
TEMPO_TOLERANCE = 0.1
"""Tempo changes within 10% of a part's opening tempo do not split it (see split_and_quantize)."""


@dataclass(frozen=True)
class DatasetOptions:
    eval_ratio: float = 0.10
    seed: int = 0
    transpose: tuple[int, int] = (-4, 4)
    min_steps: int = 80
    max_steps: int = 512
    recursive: bool = False
    tempo_tolerance: float = TEMPO_TOLERANCE

    def validate(self) -> None:
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ChiptuneError(f"--eval-ratio must be in [0, 1), got {self.eval_ratio}")
        lo, hi = self.transpose
        if lo > hi:
            raise ChiptuneError(f"--transpose range {lo},{hi} is empty (first must be <= second)")
        if not 0.0 <= self.tempo_tolerance < 1.0:
            raise ChiptuneError(f"--tempo-tolerance must be in [0, 1), got {self.tempo_tolerance}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ChiptuneError(f"--min-steps ({self.min_steps}) must be between 1 and --max-steps ({self.max_steps})")


@dataclass
class FileResult:
    """What one MIDI file contributed: its windows (as quantized pieces) and the step accounting."""

    name: str
    windows: list[QuantizedPiece] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    pieces: int = 0
    note_steps: int = 0
    kept_note_steps: int = 0
    reference_note_steps: int = 0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


def find_midi_files(input_dir: Path, recursive: bool) -> list[Path]:
    """MIDI files under the folder, sorted by relative path so every run sees the same order."""
    if not input_dir.is_dir():
        what = "a file, not a folder" if input_dir.exists() else "input folder does not exist"
        raise ChiptuneError(f"{input_dir}: {what} (--input-dir takes a folder of MIDI files)")
    pattern = "**/*" if recursive else "*"
    files = [p for p in input_dir.glob(pattern) if p.is_file() and p.suffix.lower() in MIDI_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(input_dir).as_posix())


def split_files(files: list[Path], eval_ratio: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split by file, deterministically for a seed: the same files always land in eval."""
    n = len(files)
    k = round(n * eval_ratio)
    if eval_ratio > 0 and n > 1:
        k = min(max(k, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    eval_idx = set(order[:k].tolist())
    train = [f for i, f in enumerate(files) if i not in eval_idx]
    evals = [f for i, f in enumerate(files) if i in eval_idx]
    return train, evals


def bar_windows(part: QuantizedPiece, min_steps: int, max_steps: int) -> list[tuple[int, int]]:
    """Bar-aligned [first, last) windows of at most max_steps covering the part.

    A leftover shorter than min_steps is covered by sliding the last window back (still on a bar line)
    so it overlaps the one before instead of being dropped.
    """
    total = part.num_steps
    if total < min_steps:
        return []
    if total <= max_steps:
        return [(0, total)]
    bar = part.steps_per_bar
    span = max(bar, (max_steps // bar) * bar) if bar <= max_steps else max_steps
    windows = []
    first = 0
    while first < total:
        last = min(first + span, total)
        if last - first < min_steps:
            back = -(-(total - span) // bar) * bar if bar <= max_steps else total - span
            windows.append((max(0, back), total))
            break
        windows.append((first, last))
        first = last
    return windows


def process_file(path: Path, display: str, min_steps: int, max_steps: int,
                 tempo_tolerance: float = TEMPO_TOLERANCE) -> FileResult:
    """Read, split, quantize and window one file; errors become a reason, never an exception.

    `reference_note_steps` is what the reference's rule keeps: a split at every tempo change, and parts
    outside min_steps..max_steps dropped whole."""
    result = FileResult(display)
    try:
        piece = read_midi(path)
        result.warnings = piece.warnings
        parts = split_and_quantize(piece, tempo_tolerance=tempo_tolerance)
        strict = split_and_quantize(piece) if tempo_tolerance else parts
    except MidiError as exc:
        result.error = exc.reason
        return result
    except Exception as exc:  # a malformed file must never stop the whole dataset build
        result.error = f"unreadable ({type(exc).__name__}: {exc})"
        return result
    if not parts:
        result.error = "no pitched notes"
        return result
    result.reference_note_steps = sum(p.note_steps for p in strict if min_steps <= p.num_steps <= max_steps)
    for part in parts:
        result.note_steps += part.note_steps
        covered = np.zeros(part.num_steps, dtype=bool)
        for first, last in bar_windows(part, min_steps, max_steps):
            win = part.window(first, last)
            if len(win) == 0:
                continue
            result.windows.append(win)
            result.finished.append(last == part.num_steps)
            covered[first:last] = True
        if covered.any():
            result.pieces += 1
            # Note-steps inside covered steps: count per note the covered part of [start, end).
            cum = np.concatenate([[0], np.cumsum(covered)])
            result.kept_note_steps += int(np.sum(cum[part.end] - cum[part.start]))
    if not result.windows:
        result.error = f"every part is shorter than {min_steps} steps"
    return result


def _process(args: tuple[Path, str, int, int, float]) -> FileResult:
    return process_file(*args)


def _results(jobs: list[tuple[Path, str, int, int, float]], workers: int) -> Iterator[FileResult]:
    if workers <= 1 or len(jobs) < 8:
        yield from map(_process, jobs)
        return
    pool = new_executor(workers)
    try:
        yield from pool.map(_process, jobs, chunksize=4)
    except BaseException:  # Ctrl-C: stop the workers now (waiting for them can hang)
        stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class ShardWriter:
    """Collects sequences and writes `<split>-NNNNN-<hash>.npz` shards of flat events + offsets.

    Shards are written under a hidden partial name and renamed into place by `commit` under a name that
    carries a hash of the split's contents, so they never replace the shards of the dataset in the folder:
    until the new summary.json takes its place, the old summary and its shards are untouched.
    """

    def __init__(self, out_dir: Path, split: str) -> None:
        self.out_dir = out_dir
        self.split = split
        self.buffer: list[np.ndarray] = []
        self.shards: list[str] = []
        self.sequences = 0
        self.events = 0
        self.lengths: list[int] = []
        self._staged: list[Path] = []
        self._digest = hashlib.blake2b(digest_size=4)

    def add(self, events: np.ndarray) -> None:
        self.buffer.append(events)
        self.sequences += 1
        self.events += len(events)
        self.lengths.append(len(events))
        if len(self.buffer) >= SHARD_SEQUENCES:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in self.buffer])]).astype(np.int64)
        events = np.concatenate(self.buffer).astype(np.int16)
        self._digest.update(events.tobytes())
        self._digest.update(offsets.tobytes())
        staged = self.out_dir / f".{self.split}-{len(self._staged):05d}.npz.partial"
        self._staged.append(staged)
        with open(staged, "wb") as fh:
            np.savez(fh, events=events, offsets=offsets)
        self.buffer = []

    def commit(self) -> None:
        """Rename the staged shards into place; `shards` then lists their final names."""
        tag = self._digest.hexdigest()
        self.shards = [f"{self.split}-{k:05d}-{tag}.npz" for k in range(len(self._staged))]
        for staged, name in zip(self._staged, self.shards, strict=True):
            os.replace(staged, self.out_dir / name)

    def discard(self, keep: set[str] = frozenset()) -> None:
        """Remove what this writer staged or committed (a build that did not complete), except the names in
        `keep` (the folder's current dataset, which a rebuild of identical contents shares names with)."""
        for path in [*self._staged, *(self.out_dir / n for n in self.shards if n not in keep)]:
            path.unlink(missing_ok=True)


def build_dataset(input_dir: str | Path, output_dir: str | Path, options: DatasetOptions,
                  workers: int | None = None, show_progress: bool = True) -> dict:
    """Build the dataset and return the summary (also written to OUT/summary.json)."""
    options.validate()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    files = find_midi_files(input_dir, options.recursive)
    if not files:
        raise ChiptuneError(f"{input_dir}: no MIDI files found (looked for {', '.join(sorted(MIDI_SUFFIXES))}"
                            + ("" if options.recursive else "; add --recursive to search subfolders") + ")")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [output_dir, *output_dir.parents] if p.exists() or p.is_symlink()), output_dir)
        raise ChiptuneError(f"{blocker}: is a file, not a folder for the dataset") from None
    except OSError as exc:
        raise ChiptuneError(f"{output_dir}: cannot create the folder ({exc.strerror or exc})") from None
    previous = _own_shards(output_dir)
    writers = {s: ShardWriter(output_dir, s) for s in SPLITS}
    try:
        summary = _build(files, input_dir, output_dir, options, writers, workers, show_progress)
        for split, w in writers.items():
            w.commit()
            summary["splits"][split]["shards"] = w.shards
        tmp = output_dir / "summary.json.partial"
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, output_dir / "summary.json")  # the one step that makes the new dataset the folder's
    except BaseException:
        for w in writers.values():
            w.discard(keep=previous)
        (output_dir / "summary.json.partial").unlink(missing_ok=True)
        raise
    written = {name for w in writers.values() for name in w.shards}
    for name in previous - written:  # shards of the dataset this one replaces, and nothing else
        (output_dir / name).unlink(missing_ok=True)
    return summary


def _own_shards(output_dir: Path) -> set[str]:
    """The shard files the folder's current summary.json lists (the only files a rebuild may remove)."""
    try:
        summary = json.loads((output_dir / "summary.json").read_text(encoding="utf-8"))
        names = {str(n) for s in summary["splits"].values() for n in s["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {n for n in names if _SHARD_NAME.fullmatch(n)}


def _build(files: list[Path], input_dir: Path, output_dir: Path, options: DatasetOptions,
           writers: dict[str, ShardWriter], workers: int | None, show_progress: bool) -> dict:
    train_files, eval_files = split_files(files, options.eval_ratio, options.seed)
    split_of = {f: "eval" for f in eval_files} | {f: "train" for f in train_files}
    jobs = [(f, f.relative_to(input_dir).as_posix(), options.min_steps, options.max_steps, options.tempo_tolerance)
            for f in files]
    stats = {s: {"files": 0, "pieces": 0, "windows": 0} for s in SPLITS}
    skipped: list[dict[str, str]] = []
    note_steps = kept = reference = 0
    lo, hi = options.transpose
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    for f, res in zip(files, progress(_results(jobs, workers), total=len(jobs), desc="dataset", unit="file",
                                      disable=not show_progress), strict=True):
        note_steps += res.note_steps  # a file skipped for being too short still counts as music lost
        for warning in res.warnings:
            print_warning(f"{res.name}: {warning}")
        if res.error and not res.windows:
            print(f"skipped {res.name}: {res.error}", file=sys.stderr)
            skipped.append({"file": res.name, "reason": res.error})
            continue
        split = split_of[f]
        kept += res.kept_note_steps
        reference += res.reference_note_steps
        stats[split]["files"] += 1
        stats[split]["pieces"] += res.pieces
        stats[split]["windows"] += len(res.windows)
        shifts = range(lo, hi + 1) if split == "train" else (0,)
        for win, finished in zip(res.windows, res.finished, strict=True):
            for shift in shifts:
                moved = win.transposed(shift)
                if moved is not None:
                    writers[split].add(encode(moved, start=True, end=finished))
    for w in writers.values():
        w.flush()
    usable = sum(stats[s]["files"] for s in SPLITS)
    if usable == 0:
        raise ChiptuneError(f"{input_dir}: none of the {len(files)} MIDI files was usable "
                            f"(first problem: {skipped[0]['file']}: {skipped[0]['reason']})")
    summary = {
        "encoding": ENCODING_VERSION,
        "num_classes": NUM_CLASSES,
        "steps_per_quarter": STEPS_PER_QUARTER,
        "input_dir": str(input_dir),
        "options": {"eval_ratio": options.eval_ratio, "seed": options.seed, "transpose": list(options.transpose),
                    "min_steps": options.min_steps, "max_steps": options.max_steps,
                    "recursive": options.recursive, "tempo_tolerance": options.tempo_tolerance},
        "files_read": len(files),
        "files_used": usable,
        "files_skipped": skipped,
        "splits": {
            s: {**stats[s], "sequences": writers[s].sequences, "events": writers[s].events,
                "max_length": max(writers[s].lengths, default=0), "shards": writers[s].shards}
            for s in SPLITS
        },
        "note_steps": {
            "input": note_steps,
            "kept": kept,
            "kept_fraction": round(kept / note_steps, 4) if note_steps else 0.0,
            "reference_discard_rule_fraction": round(reference / note_steps, 4) if note_steps else 0.0,
        },
    }
    return summary


def read_summary(dataset_dir: str | Path) -> dict:
    """A dataset's summary.json, checked: readable, of this encoding, with both splits' shard lists."""
    dataset_dir = Path(dataset_dir)
    summary_path = dataset_dir / "summary.json"
    if not summary_path.is_file():
        raise ChiptuneError(f"{dataset_dir}: not a dataset folder (no summary.json); "
                            "build one with 'chiptune-forge dataset'")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        encoding = summary.get("encoding")
        if encoding == ENCODING_VERSION:
            for split in SPLITS:
                shards = summary["splits"][split]["shards"]
                if not isinstance(shards, list) or not all(isinstance(name, str) for name in shards):
                    raise ValueError(f"the {split} shard list is not a list of file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ChiptuneError(f"{summary_path}: damaged dataset summary ({exc}); rebuild the dataset") from None
    if encoding != ENCODING_VERSION:
        raise ChiptuneError(f"{summary_path}: encoding {encoding!r} is not {ENCODING_VERSION!r}; "
                            "rebuild the dataset")
    for key, want in (("num_classes", NUM_CLASSES), ("steps_per_quarter", STEPS_PER_QUARTER)):
        if summary.get(key, want) != want:
            raise ChiptuneError(f"{summary_path}: {key} is {summary[key]!r}, this version reads {want!r}; "
                                "rebuild the dataset")
    return summary


def load_split(dataset_dir: str | Path, split: str) -> list[np.ndarray]:
    """All sequences of one split as int16 arrays (the dataset is small enough to hold in memory)."""
    dataset_dir = Path(dataset_dir)
    shards = read_summary(dataset_dir)["splits"][split]["shards"]
    sequences: list[np.ndarray] = []
    for name in shards:
        try:
            with np.load(dataset_dir / name) as shard:
                events, offsets = shard["events"], shard["offsets"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise ChiptuneError(f"{dataset_dir / name}: damaged or missing dataset shard "
                                f"({getattr(exc, 'strerror', None) or exc}); rebuild the dataset") from None
        sequences.extend(events[a:b] for a, b in itertools.pairwise(offsets))
    return sequences
