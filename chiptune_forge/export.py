"""Loudness and files: normalize a rendered track, then write OGG/WAV with loop metadata, atomically.

What each reader takes (see docs/loop-metadata.md in the shared docs):
- OGG Vorbis: comments `LOOPSTART` and `LOOPLENGTH`, upper case, integer sample frames (SDL_mixer/pygame,
  RPG Maker MV/MZ, PyMusicLooper, vgmstream). The file ends exactly at the loop end.
- WAV: 16-bit PCM plus a `smpl` chunk with one forward loop whose end is the last frame played (inclusive,
  as the spec says; SDL_mixer, Godot, Unity, Unreal read it).
- Godot (optional `.import` next to each file): Ogg `loop`/`loop_offset` in seconds; WAV `edit/loop_mode`
  Forward with `edit/loop_begin`/`edit/loop_end` in frames, end exclusive as Godot plays it.
- A JSON sidecar `NAME.json` with the loop in frames and seconds, tempo, bars and measured loudness.

Every file of a track is first written under a hidden temporary name that no engine takes for an asset
(`.NAME.ogg.partial`) and renamed into place only when all of them are complete, so a game watching the
folder never sees half a track, and a failed export leaves the previous files untouched.

soundfile and mutagen (Ogg), soxr (true peak) and hashlib are imported where they are used: a plain WAV
render, the commonest call, needs none of them and starts faster without.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import signal
import struct
import threading
import wave
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import ChiptuneError
from .loops import SPLIT_PARTS, TrackAudio, check_sample_rate, godot_import_file, jingle_ending, split_clip
from .snes.echo import to_float
from .staging import StagedFiles

TARGET_LUFS = -16.0
TRUE_PEAK_DB = -1.0
LOUDNESS_RANGE = (-70.0, 0.0)
"""LUFS targets accepted: from the BS.1770 absolute gate up to (not including) full scale."""
TRUE_PEAK_RANGE = (-20.0, 0.0)
"""dBTP ceilings accepted: below -20 a track would be normalized to near silence."""
FORMATS = ("ogg", "wav")
VORBIS_QUALITY = 0.5
"""libvorbis quality 0..1 (0.5 is about 160 kbit/s stereo at 44.1 kHz)."""

VORBIS_CHUNK_FRAMES = 16384
"""Frames handed to the Vorbis encoder per call: libvorbis allocates its analysis buffer on the stack, and
one call with minutes of audio overflows it (a segfault; libsndfile issue #1095, python-soundfile #233)."""
PCM_BLOCK = 16384  # frames converted to 16 bits at a time (128 KiB of float32 pairs)

TRUE_PEAK_OVERSAMPLING = 4
CEILING_MARGIN_DB = 0.05
CEILING_TRIES = 8
LOUDNESS_BLOCK_SECONDS = 0.4

_GODOT_UID = re.compile(r'^uid="(uid://[0-9a-z]+)"\s*$', re.MULTILINE)
_NAME = re.compile(r"^[^./\\][^/\\]*$")

Loop = tuple[int, int] | None
"""(start, length) in frames, or None for a clip that does not loop."""


# -------------------------------------------------------------------------------------------- loudness


def loudness_problem(lufs: float) -> str | None:
    """Why a loudness target cannot be used (None: it can), for the option or key that gave it."""
    if LOUDNESS_RANGE[0] <= lufs < LOUDNESS_RANGE[1]:
        return None
    return f"{lufs:g} LUFS is out of range (use {LOUDNESS_RANGE[0]:g} up to below 0, e.g. {TARGET_LUFS:g})"


def true_peak_problem(dbtp: float) -> str | None:
    """Why a true-peak ceiling cannot be used (None: it can), for the option or key that gave it."""
    if TRUE_PEAK_RANGE[0] <= dbtp <= TRUE_PEAK_RANGE[1]:
        return None
    return f"{dbtp:g} dBTP is out of range (use {TRUE_PEAK_RANGE[0]:g} to 0, e.g. {TRUE_PEAK_DB:g})"


def measure_loudness(track: TrackAudio) -> float:
    """Integrated loudness (ITU-R BS.1770, gated) in LUFS over intro + one body, i.e. the whole file.

    The gate needs at least one 400 ms block: a shorter loop is measured over as many body passes as
    make one block (what a player hears), a shorter jingle over itself padded with silence.
    -inf for digital silence. Measured in float32 (pyloudnorm keeps the input's type): half the memory
    and time of float64, and within 1e-6 dB of it. pyloudnorm is imported here, not with the module: it
    loads scipy.signal, which costs more than a plain render of a whole piece.
    """
    import pyloudnorm

    audio = np.asarray(track.audio, dtype=np.float32)
    need = math.ceil(LOUDNESS_BLOCK_SECONDS * track.sample_rate) + 1
    if audio.shape[0] < need:
        if track.looping:
            body = audio[track.loop_start:]
            repeats = math.ceil((need - audio.shape[0]) / body.shape[0])
            audio = np.concatenate([audio, *([body] * repeats)])
        else:
            audio = np.concatenate([audio, np.zeros((need - audio.shape[0], 2), np.float32)])
    return float(pyloudnorm.Meter(track.sample_rate).integrated_loudness(audio))


def true_peak_db(audio: np.ndarray, sample_rate: int, loop_start: int | None = None) -> float:
    """True peak in dBTP: the largest magnitude of the 4x oversampled signal (BS.1770-4, Annex 2).

    For a loop, the first milliseconds of the body are appended after its end, so a peak between the
    last frame and the loop start, which the player interpolates across, counts too. -inf for silence.
    """
    import soxr

    x = np.asarray(audio, dtype=np.float32)
    if loop_start is not None:
        x = np.concatenate([x, x[loop_start:loop_start + sample_rate // 100]])
    stream = soxr.ResampleStream(sample_rate, sample_rate * TRUE_PEAK_OVERSAMPLING, x.shape[1],
                                 dtype="float32", quality="HQ")
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    step = 1 << 16
    for i in range(0, x.shape[0], step):
        chunk = stream.resample_chunk(x[i:i + step], last=i + step >= x.shape[0])
        if chunk.size:
            peak = max(peak, float(np.max(np.abs(chunk))))
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def _scaled(audio: np.ndarray, gain_db: float) -> np.ndarray:
    return (audio * np.float32(10 ** (gain_db / 20))).astype(np.float32)


def fit_ceiling(track: TrackAudio, gain_db: float, ceiling_db: float = TRUE_PEAK_DB,
                formats: Sequence[str] = ("ogg",)) -> float:
    """The largest gain at most `gain_db` that keeps the true peak under the ceiling in the float audio
    and, when an OGG is among `formats`, after a Vorbis encode/decode round trip (the codec can overshoot
    the input's peaks; a WAV holds the samples themselves).

    The encoder is deterministic, so the OGG that export_track later writes from the same samples has
    exactly the peaks checked here.
    """
    gain = min(gain_db, ceiling_db - true_peak_db(track.audio, track.sample_rate, track.loop_start))
    if "ogg" not in {f.lower() for f in formats} or math.isinf(gain):  # inf: a silent track
        return gain
    for _ in range(CEILING_TRIES):
        over = _vorbis_true_peak_db(_scaled(track.audio, gain), track.sample_rate, track.loop_start) - ceiling_db
        if over <= 0:
            return gain
        gain -= over + CEILING_MARGIN_DB
    raise RuntimeError(f"the Vorbis true peak stays above {ceiling_db} dBTP after {CEILING_TRIES} tries")


def normalize(track: TrackAudio, target_lufs: float = TARGET_LUFS, true_peak_db: float = TRUE_PEAK_DB,
              gain_db: float | None = None, *, formats: Sequence[str] = ("ogg",),
              loudness_lufs: float | None = None) -> tuple[TrackAudio, float]:
    """Scale a track to `target_lufs` integrated loudness, less if the true-peak ceiling demands it.

    With `gain_db` given (same-gain mode) that gain is applied exactly, keeping the tracks' relative
    levels; the caller picks it within every track's headroom (fit_ceiling tells a track's, codec included).
    The ceiling is checked for the files `formats` will write; `loudness_lufs` is the track's
    measure_loudness when the caller has it already. Returns the scaled track and the gain applied in dB;
    a silent track gets 0 dB.
    """
    if gain_db is None:
        loudness = measure_loudness(track) if loudness_lufs is None else loudness_lufs
        gain_db = 0.0 if math.isinf(loudness) else fit_ceiling(track, target_lufs - loudness, true_peak_db,
                                                                formats)
    return replace(track, audio=_scaled(track.audio, gain_db)), gain_db


# -------------------------------------------------------------------------------------------- encoders


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then act on it.

    soundfile reads and writes in-memory files through callbacks from C; a KeyboardInterrupt raised inside
    one cannot unwind through libsndfile, so it is printed as an ignored exception and the encoder goes on
    with a failed write. The blocks this guards take under a second per minute of audio.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # not ours to defer: another thread, or a handler installed outside Python
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt


_last_vorbis: dict[tuple, tuple[bytes, np.ndarray, dict[int | None, float]]] = {}


def _vorbis(audio: np.ndarray, sample_rate: int) -> tuple[bytes, np.ndarray, dict[int | None, float]]:
    """Encode to Ogg Vorbis and decode it back, remembering the last result (with the true peaks measured
    on it so far, by loop start).

    The encoder is deterministic, so the true-peak check in `fit_ceiling`, the file `write_ogg` writes and
    the peak measured for the sidecar all share one encode of the same samples instead of three.
    """
    import hashlib

    import soundfile

    digest = hashlib.blake2b(np.ascontiguousarray(audio).tobytes(), digest_size=16).digest()
    key = (sample_rate, audio.shape, digest)
    if key not in _last_vorbis:
        buf = io.BytesIO()
        with _interrupt_after():
            with soundfile.SoundFile(buf, "w", sample_rate, 2, subtype="VORBIS", format="OGG",
                              compression_level=1.0 - VORBIS_QUALITY) as f:
                for i in range(0, audio.shape[0], VORBIS_CHUNK_FRAMES):
                    f.write(audio[i:i + VORBIS_CHUNK_FRAMES])
            data = _with_serial(buf.getvalue(), int.from_bytes(digest[:4], "little"))
            decoded = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)[0]
        _last_vorbis.clear()
        _last_vorbis[key] = (data, decoded, {})
    return _last_vorbis[key]


def _with_serial(data: bytes, serial: int) -> bytes:
    """The Ogg stream with every page's serial number set to `serial` (CRCs recomputed by mutagen).
    libsndfile picks a random serial per file, so the same audio would give different bytes on every
    build and show as changed in the game's version control."""
    from mutagen.ogg import OggPage

    src = io.BytesIO(data)
    pages = []
    while src.tell() < len(data):
        page = OggPage(src)
        page.serial = serial
        pages.append(page.write())
    return b"".join(pages)


def encode_vorbis(target: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    Path(target).write_bytes(_vorbis(audio, sample_rate)[0])


def _vorbis_round_trip(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    return _vorbis(audio, sample_rate)[1]


def _vorbis_true_peak_db(audio: np.ndarray, sample_rate: int, loop_start: int | None) -> float:
    """True peak of the audio as the OGG will play it; the ceiling check and the sidecar ask for the same
    encode, so it is measured once."""
    _, decoded, peaks = _vorbis(audio, sample_rate)
    if loop_start not in peaks:
        peaks[loop_start] = true_peak_db(decoded, sample_rate, loop_start)
    return peaks[loop_start]


def write_ogg(path: Path, audio: np.ndarray, sample_rate: int, loop: Loop) -> None:
    """Ogg Vorbis with LOOPSTART/LOOPLENGTH comments (frames, upper case) written by mutagen."""
    encode_vorbis(path, audio, sample_rate)
    frames = len(_vorbis_round_trip(audio, sample_rate))
    if frames != audio.shape[0]:
        raise ChiptuneError(f"{path}: the Vorbis encoder wrote {frames} frames instead of {audio.shape[0]}")
    if loop is not None:
        from mutagen.oggvorbis import OggVorbis

        ogg = OggVorbis(path)
        ogg.tags["LOOPSTART"] = [str(loop[0])]
        ogg.tags["LOOPLENGTH"] = [str(loop[1])]
        ogg.save()


def smpl_chunk(sample_rate: int, start: int, end_inclusive: int) -> bytes:
    """A RIFF `smpl` chunk with one infinite forward loop over frames start..end_inclusive."""
    header = (0, 0, round(1e9 / sample_rate), 60, 0, 0, 0, 1, 0)  # manufacturer .. sampler data size
    loop = (0, 0, start, end_inclusive, 0, 0)  # cue id, type forward, start, end, fraction, play count
    body = struct.pack("<9I6I", *header, *loop)
    return b"smpl" + struct.pack("<I", len(body)) + body


def pcm16_blocks(audio: np.ndarray) -> Iterator[np.ndarray]:
    """Float audio in [-1, 1] as 16-bit samples, x * 32768 rounded to nearest and clipped to 16 bits, a
    block of PCM_BLOCK frames at a time (each block is only valid until the next is made).

    Converted here rather than by libsndfile, which rounds down (half an LSB of offset) and is several
    times slower on a whole piece. The sampler's output is a 16-bit value / 32768, so it is kept exactly.
    Block by block, the four passes stay in the cache, and the file is written without a copy of the whole
    piece in 16 bits.
    """
    work = np.empty((PCM_BLOCK, *audio.shape[1:]), dtype=np.float32)
    pcm = np.empty(work.shape, dtype=np.int16)
    for b in range(0, len(audio), PCM_BLOCK):
        part = audio[b:b + PCM_BLOCK]
        w, out = work[:len(part)], pcm[:len(part)]
        np.multiply(part, np.float32(0x8000), out=w)
        np.rint(w, out=w)
        np.clip(w, -0x8000, 0x7FFF, out=w)
        out[...] = w
        yield out


def write_wav(path: Path, audio: np.ndarray, sample_rate: int, loop: Loop) -> None:
    """16-bit PCM WAV with a `smpl` chunk appended when the clip loops.

    Written by the standard library's wave module: PCM needs no codec, and a render to WAV then never loads
    libsndfile (a tenth of a plain render's start-up). Stereo 16-bit data is always an even number of bytes,
    so the chunk needs no RIFF pad byte before it.
    """
    with open(path, "w+b") as f:
        with _pcm16_wave(f, audio.shape[1], sample_rate) as w:
            w.setnframes(len(audio))  # the header is right from the start, not patched after every block
            for block in pcm16_blocks(audio):
                _write_frames(w, block)
        if loop is None:
            return
        f.write(smpl_chunk(sample_rate, loop[0], loop[0] + loop[1] - 1))
        size = f.tell()
        f.seek(4)
        f.write(struct.pack("<I", size - 8))


def _pcm16_wave(f: BinaryIO, channels: int, sample_rate: int) -> wave.Wave_write:
    """A 16-bit PCM WAV writer on an open file."""
    w = wave.Wave_write(f)
    w.setnchannels(channels)
    w.setsampwidth(2)
    w.setframerate(sample_rate)
    return w


def _write_frames(w: wave.Wave_write, block: np.ndarray) -> None:
    w.writeframesraw(memoryview(block).cast("B"))  # native-order int16, as wave expects


def write_jingle_wav(final: Path, blocks: Iterable[np.ndarray], music_end: int, sample_rate: int
                     ) -> tuple[int, float]:
    """Write a jingle as a 16-bit WAV from the chip's output a block at a time (int32 (2, n) 16-bit values,
    as render.chip_blocks gives them): the same file as export_track(render_track(..., loop=False)) writes
    without a sidecar, made without holding the piece.

    Blocks before `music_end` go to the file as they come; a block from there on is what rings on after the
    music (chip_blocks never lets a block span the music's end and gives the ringing as one last block),
    ended as loops.jingle_ending ends it. The file is staged and renamed into place like every export.
    Returns the frames written and their sample peak (a fraction of full scale).
    """
    def write(path: Path) -> None:
        with open(path, "w+b") as f, _pcm16_wave(f, 2, sample_rate) as w:  # sizes set when it closes
            pcm = np.empty((0, 2), dtype=np.int16)
            peak, done = 0, 0
            tail = np.zeros((0, 2), dtype=np.float32)
            for block in blocks:
                n = block.shape[1]
                if done >= music_end:  # 16-bit values / 32768, as render_piece gives them
                    tail = to_float(block, np.empty((n, 2), dtype=np.float32))
                    continue
                peak = max(peak, int(block.max()), -int(block.min()))
                if len(pcm) < n:
                    pcm = np.empty((n, 2), dtype=np.int16)
                out = pcm[:n]
                out[:, 0] = block[0]
                out[:, 1] = block[1]
                _write_frames(w, out)
                done += n
            ending = jingle_ending(tail, peak / 32768, sample_rate)
            for out in pcm16_blocks(ending):
                _write_frames(w, out)
            result.append((done + len(ending), max(peak / 32768, float(np.abs(ending).max(initial=0.0)))))

    result: list[tuple[int, float]] = []
    with StagedFiles() as files:
        files.write(final, write)
        files.commit()
    return result[0]


WRITERS: dict[str, Callable[[Path, np.ndarray, int, Loop], None]] = {"ogg": write_ogg, "wav": write_wav}


def _godot_params(fmt: str, sample_rate: int, loop: Loop) -> dict[str, str]:
    """The loop settings Godot 4 reads from an asset's `.import` [params]."""
    if fmt == "ogg":
        return {"loop": "true" if loop else "false",
                "loop_offset": repr(loop[0] / sample_rate) if loop else "0.0"}
    if loop:
        return {"edit/loop_mode": "2", "edit/loop_begin": str(loop[0]), "edit/loop_end": str(loop[0] + loop[1])}
    return {"edit/loop_mode": "1"}


def godot_import_text(fmt: str, sample_rate: int, loop: Loop, uid: str | None = None) -> str:
    """Godot 4 `.import` settings; Godot keeps [params] and the uid when it reimports the file."""
    if fmt == "ogg":
        remap = ['importer="oggvorbisstr"', 'type="AudioStreamOggVorbis"']
    else:
        remap = ['importer="wav"', 'type="AudioStreamWAV"']
    if uid:
        remap.append(f'uid="{uid}"')
    params = [f"{key}={value}" for key, value in _godot_params(fmt, sample_rate, loop).items()]
    return "[remap]\n\n" + "\n".join(remap) + "\n\n[params]\n\n" + "\n".join(params) + "\n"


def godot_import_agrees(import_file: Path, fmt: str, sample_rate: int, loop: Loop) -> bool:
    """Whether the `.import` settings beside an asset (ours or Godot's own) loop it as `loop` says.

    Godot's own defaults agree with a clip that does not loop, and a WAV's "detect" mode (0) follows the
    file's smpl chunk, so it agrees with anything export writes. True when the file cannot be read.
    """
    import configparser

    settings = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        settings.read_string(import_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, configparser.Error):
        return True
    params = settings["params"] if settings.has_section("params") else {}
    if fmt != "ogg" and params.get("edit/loop_mode", "0") == "0":
        return True
    want = _godot_params(fmt, sample_rate, loop)
    defaults = _godot_params(fmt, sample_rate, None)
    for key, value in want.items():
        have = params.get(key, defaults.get(key, value))
        try:
            if float(have) != float(value):
                return False
        except ValueError:
            if have != value:
                return False
    return True


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (the sidecar records the source MIDI's)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- export


def _decoded(path: Path) -> np.ndarray:
    import soundfile

    return soundfile.read(str(path), dtype="float32", always_2d=True)[0]


def _db_or_none(value: float) -> float | None:
    return None if math.isinf(value) else round(value, 3)


def _sidecar(track: TrackAudio, name: str, files: list[str], loudness: float, peak: float,
             info: dict | None, split: dict[str, list[str]]) -> dict:
    rate = track.sample_rate
    data = dict(info or {})
    data.update({
        "name": name,
        "files": files,
        "sample_rate": rate,
        "frames": track.frames,
        "seconds": track.frames / rate,
        "loop": track.looping,
        "loop_start_frames": track.loop_start,
        "loop_length_frames": track.loop_length,
        "loop_end_frames": track.loop_end,
        "loop_start_seconds": None if track.loop_start is None else track.loop_start / rate,
        "loop_length_seconds": None if track.loop_length is None else track.loop_length / rate,
        "loop_end_seconds": None if track.loop_end is None else track.loop_end / rate,
        "qpm": track.qpm,
        "bars": track.bars,
        "intro_bars": track.intro_bars,
        "loudness_lufs": _db_or_none(loudness),
        "true_peak_dbtp": _db_or_none(peak),
    })
    if split:
        data["split"] = split
    return data


def sidecar_listed(out_dir: Path, name: str, others: Collection[str] = ()) -> list[str]:
    """The asset file names (main files and split clips) that an earlier export's NAME.json lists; nothing
    when there is no such sidecar, it is not ours for that name, or a build of one of the `others` wrote it
    (the file names of the manifests beside this one that have a track of that name)."""
    try:
        data = json.loads((Path(out_dir) / f"{name}.json").read_text(encoding="utf-8"))
        listed = [*data["files"], *(f for clips in (data.get("split") or {}).values() for f in clips)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    if data.get("name") != name or not all(isinstance(f, str) and Path(f).name == f for f in listed):
        return []
    writer = data.get("manifest")
    return [] if isinstance(writer, str) and writer in others else listed


def _check_request(track: TrackAudio, name: str, formats: Sequence[str]) -> list[str]:
    if not _NAME.match(name):
        raise ChiptuneError(f"track name {name!r} must be a plain file name (no folders, not hidden)")
    fmts = list(dict.fromkeys(f.lower() for f in formats))
    if not fmts:
        raise ChiptuneError(f"track {name!r}: no output format given (use ogg and/or wav)")
    for f in fmts:
        if f not in WRITERS:
            raise ChiptuneError(f"track {name!r}: unsupported format {f!r} (use ogg or wav)")
    check_sample_rate(track.sample_rate)
    return fmts


def export_track(track: TrackAudio, out_dir: Path, name: str, formats: Sequence[str] = ("ogg",),
                 sidecar_info: dict | None = None, godot_import: bool = False,
                 split: bool = False, loudness_lufs: float | None = None, sidecar: bool = True) -> list[Path]:
    """Write NAME.<fmt> for each format, plus NAME.json, and optionally Godot `.import` files and the
    split clips NAME_intro.<fmt> + NAME_loop.<fmt> (jingles have nothing to split; without an intro only
    the loop clip is written). Returns the final paths. Without `sidecar` no NAME.json is written and
    nothing is measured.

    `sidecar_info` adds keys to the sidecar (e.g. "midi_sha256", "gain_db"); the measured keys win.
    The sidecar's `true_peak_dbtp` is measured on the written files, decoded; its `loudness_lufs` is
    `loudness_lufs` when the caller knows the track's (the loudness before normalizing plus the gain), else
    measured.
    """
    fmts = _check_request(track, name, formats)
    out_dir = Path(out_dir)
    rate = track.sample_rate
    clips: list[tuple[str, np.ndarray, Loop]] = [
        (name, track.audio, (track.loop_start, track.loop_length) if track.looping else None)]
    split_names: dict[str, list[str]] = {}
    if split and track.looping:
        s, n = track.loop_start, track.loop_length
        if s:
            clips.append((split_clip(name, "intro"), track.audio[:s], None))
        clips.append((split_clip(name, "loop"), track.audio[s:s + n], (0, n)))
        split_names = {part: [f"{split_clip(name, part)}.{fmt}" for fmt in fmts]
                       for part in (SPLIT_PARTS if s else SPLIT_PARTS[1:])}
    with StagedFiles() as files:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ChiptuneError(f"{out_dir}: cannot create the folder ({exc.strerror or exc})") from None
        peak = -math.inf
        for clip, audio, loop in clips:
            for fmt in fmts:
                final = out_dir / f"{clip}.{fmt}"
                tmp = files.write(final, lambda p, a=audio, lp=loop, f=fmt: WRITERS[f](p, a, rate, lp))
                if clip == name and sidecar:
                    peak = max(peak, _vorbis_true_peak_db(audio, rate, track.loop_start) if fmt == "ogg"
                               else true_peak_db(_decoded(tmp), rate, track.loop_start))
                if godot_import:
                    imp = godot_import_file(final)
                    text = godot_import_text(fmt, rate, loop, _existing_uid(imp))
                    files.write(imp, lambda p, t=text: p.write_text(t, encoding="utf-8"))
        if sidecar:
            names = [f"{name}.{fmt}" for fmt in fmts]
            loudness = measure_loudness(track) if loudness_lufs is None else loudness_lufs
            data = _sidecar(track, name, names, loudness, peak, sidecar_info, split_names)
            text = json.dumps(data, indent=2) + "\n"
            files.write(out_dir / f"{name}.json", lambda p: p.write_text(text, encoding="utf-8"))
        return files.commit()


def _existing_uid(import_file: Path) -> str | None:
    """The uid Godot gave the file before, so scenes that reference it by uid keep working."""
    try:
        match = _GODOT_UID.search(import_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    return match.group(1) if match else None
