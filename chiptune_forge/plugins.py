"""VST3 instruments hosted through pedalboard, in a child process so that a crashing plugin costs one track.

The parent side (this module's public functions and `PluginHost`) finds and checks plugin bundles, turns a
role's notes into timed MIDI and talks to one persistent worker process over a socket. The worker loads
plugins with pedalboard, keeps loaded instances cached by their full setup (so the tracks of a build that
share a preset share an instance), resets them before each render, renders until the tail has died away
and trims the plugin's reported latency, writing the audio straight into shared memory that the parent
maps rather than copies. A worker that dies is reported as a crash of that plugin and role; the next
request starts a fresh worker.

pedalboard is imported only in the worker: a plugin that crashes on load or render never takes down the
process running a build or a watch.
"""

from __future__ import annotations

import atexit
import bisect
import difflib
import itertools
import mmap
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import ChiptuneError
from .midi import DRUM_CHANNEL, Note

SEARCH_PATH_ENV = "CHIPTUNE_FORGE_VST3_PATH"
SILENCE_DBFS = -90.0
SILENCE_HOLD = 0.1  # seconds the output must stay below SILENCE_DBFS for the tail to end
SILENCE_THRESHOLD = 10.0 ** (SILENCE_DBFS / 20.0)
DEFAULT_MAX_TAIL = 10.0  # seconds rendered at most after the last MIDI event
DEFAULT_LOAD_TIMEOUT = 30.0
WORKER_START_TIMEOUT = 120.0
TAIL_BLOCK = 0.25  # seconds rendered per step while waiting for the tail to die away
RENDER_BUFFER_SIZE = 8192
RENDER_CHUNK = 4 * RENDER_BUFFER_SIZE  # frames per pedalboard call: its output stays in cache until copied
INSTANCE_CACHE_SIZE = 8
SPARE_REGIONS = 2  # shared-memory buffers the worker keeps for reuse once the parent has let go
STATE_FLUSH_SECONDS = 0.01
MAX_EVENTS_PER_TIMESTAMP = 100  # pedalboard takes more than this at one time for delta times and refuses
_BLOCK_START_STATUSES = {0xB0, 0xC0, 0xD0, 0xE0}  # control change, program change, channel pressure, pitch bend
# Shared audio is mapped with its pages populated in one go, not faulted in one by one (Linux).
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

ParameterValue = float | int | bool | str
MidiMessage = tuple[bytes, float]  # (message bytes, absolute seconds), pedalboard's own input form

# DPF-built instruments expose 16 x 130 "MIDI Ch. n CC m" parameters (their VST3 MIDI mapping). pedalboard
# hides JUCE's equivalent "MIDI CC" parameters but not these, and building its Python view of 2 080 of them
# takes about 15 s per load, so the worker adds them to pedalboard's ignore list.
_DPF_MIDI_PARAMETER = re.compile(r"MIDI Ch\. \d+ CC \d+$")


# ------------------------------------------------------------------------------------------------ types


@dataclass(frozen=True)
class PluginSpec:
    """One configured plugin as a preset role (or a command) asks for it.

    `origin` says where the request came from ("presets/x.toml: roles.lead") so that every error names it.
    `state` holds raw plugin state (a state file), `preset_data` a .vstpreset file's bytes; parameters are
    applied last, by pedalboard's normalised parameter names and in the plugin's own units. `max_tail` caps
    the seconds rendered after the last MIDI event (it is not part of the instance's setup).
    """

    path: Path
    origin: str = ""
    parameters: tuple[tuple[str, ParameterValue], ...] = ()
    state: bytes | None = None
    preset_data: bytes | None = None
    max_tail: float = DEFAULT_MAX_TAIL
    # where a preset sets each parameter, "FILE:LINE: roles.lead.parameters.NAME", for problems found on load
    parameter_origins: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    def where(self, parameter: str | None = None) -> str:
        origin = dict(self.parameter_origins).get(parameter or "") or self.origin
        return f"{origin}: plugin {self.path}" if origin else str(self.path)

    def fingerprint(self) -> dict[str, Any]:
        """What decides the sound, for build caches: the setup, and the plugin binary's size and time (so
        that installing a new version of the plugin renders again)."""
        binary_dir = self.path / "Contents" / _platform_folder()[0]
        binaries = sorted(binary_dir.iterdir()) if binary_dir.is_dir() else [self.path]
        return {"path": str(self.path), "parameters": [list(p) for p in self.parameters],
                "state_sha256": _digest(self.state), "preset_sha256": _digest(self.preset_data),
                "max_tail": self.max_tail, "binaries": [[p.name, *_stat(p)] for p in binaries if p.is_file()]}


def _digest(data: bytes | None) -> str | None:
    import hashlib  # here: loading OpenSSL's hashes costs every render 3 ms, and only plugin roles need it

    return hashlib.sha256(data).hexdigest() if data is not None else None


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class ParameterInfo:
    name: str  # pedalboard's normalised name, the one presets use
    label: str  # the plugin's own display name
    type: str  # "float", "bool" or "choice"
    default: ParameterValue | None
    minimum: float | None = None
    maximum: float | None = None
    units: str = ""
    choices: tuple[ParameterValue, ...] = ()
    # False for what the plugin does not let a host automate; that includes read-only outputs such as the
    # latency that DPF plugins report through a parameter, which a preset can set to no effect.
    automatable: bool = True


@dataclass(frozen=True)
class PluginInfo:
    name: str
    path: str
    kind: str  # "instrument" or "effect"
    latency_samples: int
    parameters: tuple[ParameterInfo, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PluginCrash(ChiptuneError):
    """The worker process died (a segfault, an abort) while loading or rendering a plugin."""


class PluginSettingError(ChiptuneError):
    """A mistake in a plugin role's settings: `key` within the role ("" for the role itself), and why.
    Presets locate it like their own problems; the message alone reads "ORIGIN.key: reason"."""

    def __init__(self, origin: str, key: str, reason: str) -> None:
        where = f"{origin}.{key}" if key else origin
        super().__init__(f"{where}: {reason}" if where else reason)
        self.key, self.reason = key, reason


class PluginUnavailable(ChiptuneError):
    """The plugin a preset names is not there, or is not a VST3 this machine can load. A build fails only
    the tracks that use it."""


# ------------------------------------------------------------------------------------- finding plugins


def vst3_search_path() -> list[Path]:
    """Folders searched for a plugin named by bundle name: $CHIPTUNE_FORGE_VST3_PATH, then the platform's."""
    dirs = [Path(os.path.expanduser(p)) for p in os.environ.get(SEARCH_PATH_ENV, "").split(os.pathsep) if p]
    home = Path.home()
    if sys.platform == "darwin":
        dirs += [home / "Library/Audio/Plug-Ins/VST3", Path("/Library/Audio/Plug-Ins/VST3")]
    elif sys.platform == "win32":
        for var, sub in (("LOCALAPPDATA", "Programs/Common/VST3"), ("COMMONPROGRAMFILES", "VST3")):
            if os.environ.get(var):
                dirs.append(Path(os.environ[var]) / sub)
    else:
        dirs += [home / ".vst3", Path("/usr/lib/vst3"), Path("/usr/local/lib/vst3")]
    return dirs


def resolve_plugin_path(text: str, base_dir: Path | None = None, origin: str = "") -> Path:
    """Turn a preset's `plugin = "..."` into a bundle path and check that it can be a plugin for this machine.

    `~` and environment variables expand; relative paths resolve against `base_dir` (the preset's folder);
    a bare bundle name ("Synth" or "Synth.vst3") that is not there is looked up on the search path.
    """
    expanded = os.path.expandvars(os.path.expanduser(text.strip()))
    if not expanded:
        raise PluginSettingError(origin, "plugin", "plugin path is empty")
    path = Path(expanded)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists() and len(Path(expanded).parts) == 1:
        names = [expanded] if expanded.lower().endswith(".vst3") else [expanded + ".vst3", expanded]
        found = _search(names)
        if found is None:
            dirs = ", ".join(str(d) for d in vst3_search_path())
            raise PluginUnavailable(_where(origin, text, f"not found as a path nor on the VST3 search path "
                                                     f"({dirs}; add folders with ${SEARCH_PATH_ENV})"))
        path = found
    path = path.absolute()
    check_bundle(path, origin)
    return path


def _search(names: Sequence[str]) -> Path | None:
    """The first bundle of one of `names` in a search folder or one level below it (vendor folders)."""
    for folder in vst3_search_path():
        if not folder.is_dir():
            continue
        for name in names:
            for candidate in (folder / name, *folder.glob(f"*/{name}")):
                if candidate.exists():
                    return candidate
    return None


def _where(origin: str, plugin: object, reason: str) -> str:
    return f"{origin}: plugin {plugin}: {reason}" if origin else f"{plugin}: {reason}"


def _platform_folder() -> tuple[str, str]:
    """The bundle subfolder holding this machine's binary, and a name for the platform."""
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if sys.platform == "darwin":
        return "MacOS", "macOS"
    if sys.platform == "win32":
        return f"{machine}-win", "Windows"
    return f"{machine}-linux", "Linux"


_BINARY_KINDS = (
    (b"\x7fELF", "a Linux binary"),
    (b"MZ", "a Windows binary"),
    (b"\xcf\xfa\xed\xfe", "a macOS binary"),
    (b"\xce\xfa\xed\xfe", "a macOS binary"),
    (b"\xca\xfe\xba\xbe", "a macOS binary"),
)


def _binary_kind(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return None
    return next((kind for magic, kind in _BINARY_KINDS if head.startswith(magic)), None)


def check_bundle(path: Path, origin: str = "") -> None:
    """Refuse, with one line each, what pedalboard would only call "unsupported plugin format or scan failure".

    Missing paths, things that are not VST3, and bundles built for another platform or processor.
    """
    if not path.exists():
        raise PluginUnavailable(_where(origin, path, "not found"))
    if path.suffix.lower() != ".vst3":
        raise PluginUnavailable(_where(origin, path, "not a VST3 plugin (expected a .vst3 bundle; VST2, AU, LV2 "
                                                 "and CLAP plugins are not supported)"))
    want, system = _platform_folder()
    if path.is_file():
        kind = _binary_kind(path)
        if kind is None:
            raise PluginUnavailable(_where(origin, path, "not a VST3 plugin (neither a bundle nor a plugin binary)"))
        if kind != f"a {system} binary":
            raise PluginUnavailable(_where(origin, path, f"is {kind}, which cannot load on {system}"))
        return
    contents = path / "Contents"
    if not contents.is_dir():
        raise PluginUnavailable(_where(origin, path, "not a VST3 bundle (it has no Contents folder)"))
    binary_dir = contents / want
    if binary_dir.is_dir() and any(p.is_file() for p in binary_dir.iterdir()):
        if sys.platform.startswith("linux"):
            for lib in binary_dir.glob("*.so"):
                if _binary_kind(lib) != "a Linux binary":
                    raise PluginUnavailable(_where(origin, path, f"Contents/{want}/{lib.name} is not a Linux "
                                                             "shared library"))
        return
    present = sorted(p.name for p in contents.iterdir() if p.is_dir() and p.name != "Resources")
    builds = [_describe_platform_folder(name) for name in present]
    builds = [b for b in builds if b]
    if builds:
        raise PluginUnavailable(_where(origin, path, f"is a {' and '.join(builds)} build; {system} on this "
                                                 f"machine needs Contents/{want}/"))
    raise PluginUnavailable(_where(origin, path, f"has no binary for this machine (Contents/{want}/ is missing)"))


def _describe_platform_folder(name: str) -> str | None:
    if name == "MacOS":
        return "macOS"
    if name.endswith("-win"):
        return f"Windows ({name[:-4]})"
    if name.endswith("-linux"):
        return f"Linux {name[:-6]}"
    return None


def plugin_spec(
    plugin: str,
    *,
    base_dir: Path | None = None,
    origin: str = "",
    parameters: Mapping[str, ParameterValue] | None = None,
    preset_file: str | None = None,
    state_file: str | None = None,
    max_tail: float = DEFAULT_MAX_TAIL,
) -> PluginSpec:
    """Build a PluginSpec from a preset role's fields: resolve the bundle and read the preset or state file."""
    path = resolve_plugin_path(plugin, base_dir, origin)
    if preset_file and state_file:
        raise PluginSettingError(origin, "state_file", f"plugin {path}: give preset_file or state_file, not both")
    if preset_file and not preset_file.lower().endswith(".vstpreset"):
        raise PluginSettingError(origin, "preset_file", f"plugin {path}: {preset_file!r} is not a .vstpreset file")
    preset_data = _read_side_file(preset_file, base_dir, origin, path, "preset_file") if preset_file else None
    state = _read_side_file(state_file, base_dir, origin, path, "state_file") if state_file else None
    if state is not None and not _is_host_state(state):
        raise PluginSettingError(origin, "state_file", f"plugin {path}: {_side_path(state_file, base_dir)} is not a "
                                                       "plugin state (write one with 'chiptune-forge plugins state')")
    params = tuple((str(k), v) for k, v in (parameters or {}).items())
    return PluginSpec(path, origin, params, state, preset_data, max_tail)


MAX_TAIL_LIMIT = 60.0


def preset_plugin(table: Mapping[str, Any], origin: str, base_dir: Path | None) -> PluginSpec:
    """The plugin a preset role table names, its keys checked: `plugin`, `parameters` (a table of the
    plugin's parameters by pedalboard's names), `preset_file` (.vstpreset) or `state_file` (raw state),
    `max_tail` (seconds rendered at most after the last note, for releases and the plugin's own reverb).

    `origin` is the role's place in the preset, "FILE: roles.lead"; every message starts with it.
    """
    plugin = table.get("plugin")
    if not isinstance(plugin, str):
        raise PluginSettingError(origin, "plugin", f"expected a .vst3 path or bundle name, got {plugin!r}")
    parameters = table.get("parameters", {})
    if not isinstance(parameters, dict):
        raise PluginSettingError(origin, "parameters",
                                 f"expected a table such as {{ cutoff = 0.4 }}, got {parameters!r}")
    for name, value in parameters.items():
        if not isinstance(value, bool | int | float | str):
            raise PluginSettingError(origin, f"parameters.{name}", f"expected a number, true/false or a string, "
                                                                   f"got {value!r}")
    files = {}
    for key in ("preset_file", "state_file"):
        value = table.get(key)
        if value is not None and not isinstance(value, str):
            raise PluginSettingError(origin, key, f"expected a file path, got {value!r}")
        files[key] = value
    max_tail = table.get("max_tail", DEFAULT_MAX_TAIL)
    if isinstance(max_tail, bool) or not isinstance(max_tail, int | float) or not 0 <= max_tail <= MAX_TAIL_LIMIT:
        raise PluginSettingError(origin, "max_tail", f"expected seconds from 0 to {MAX_TAIL_LIMIT:g}, got {max_tail!r}")
    return plugin_spec(plugin, base_dir=base_dir, origin=origin, parameters=parameters, max_tail=float(max_tail),
                       **files)


def _side_path(name: str, base_dir: Path | None) -> Path:
    path = Path(os.path.expandvars(os.path.expanduser(name)))
    return base_dir / path if not path.is_absolute() and base_dir is not None else path


def role_folders(table: Mapping[str, Any], base_dir: Path) -> set[Path]:
    """Folders holding what a preset's plugin role reads (its state or .vstpreset file, the plugin's
    binary), for watch mode. Lenient: a role table that is wrong now names what it can."""
    folders = {_side_path(v, base_dir).parent for k in ("preset_file", "state_file")
               if isinstance(v := table.get(k), str)}
    plugin = table.get("plugin")
    if isinstance(plugin, str):
        try:
            bundle = resolve_plugin_path(plugin, base_dir)
        except ChiptuneError:
            folders.add(_side_path(plugin, base_dir).parent)  # where it will appear
        else:
            binaries = bundle / "Contents" / _platform_folder()[0]
            folders.add(binaries if binaries.is_dir() else bundle.parent)
    return folders


STATE_MAGIC = b"VC2!"
"""How the plugin host (JUCE, inside pedalboard) starts a saved state: this tag, a 32-bit little-endian
length, then that many bytes. A plugin given anything else ignores it silently and keeps its defaults."""


def _is_host_state(data: bytes) -> bool:
    return (data.startswith(STATE_MAGIC) and len(data) >= 8
            and int.from_bytes(data[4:8], "little") <= len(data) - 8)


def _read_side_file(name: str, base_dir: Path | None, origin: str, plugin: Path, key: str) -> bytes:
    path = _side_path(name, base_dir)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PluginSettingError(origin, key, f"plugin {plugin}: cannot read {path} ({exc.strerror or exc})") from None
    if not data:
        raise PluginSettingError(origin, key, f"plugin {plugin}: {path} is empty")
    return data


# ----------------------------------------------------------------------------------------- MIDI events


def role_messages(notes: Iterable[Note], controls: Iterable[MidiMessage] = ()) -> list[MidiMessage]:
    """A role's notes (plus any raw control messages: CC, pitch bend) as absolute-time MIDI for pedalboard.

    Drum notes go to channel 10, the rest to channel 1. A program change goes out before a note whose
    program differs from the channel's current one (MIDI starts at program 0). A re-struck pitch ends the
    earlier note of that pitch first, as a MIDI file would. At one instant note-offs come first, then
    program changes, then controls (in the order given: a restore before the value that follows it, RPN
    selects before their data), then note-ons, so that pedals and bends apply to the notes they start with.
    """
    by_key: dict[tuple[int, int], list[Note]] = {}
    for note in notes:
        by_key.setdefault((DRUM_CHANNEL if note.is_drum else 0, note.pitch), []).append(note)
    events: list[tuple[float, int, bytes]] = []
    starts: list[tuple[float, int, Note]] = []
    for (channel, pitch), group in by_key.items():
        group.sort(key=lambda n: (n.start, n.end))
        for i, note in enumerate(group):
            end = note.end if i + 1 == len(group) else min(note.end, group[i + 1].start)
            starts.append((note.start, channel, note))
            events.append((note.start, 3, bytes([0x90 | channel, pitch, max(1, min(127, note.velocity))])))
            events.append((max(end, note.start), 0, bytes([0x80 | channel, pitch, 0])))
    program = [0] * 16
    for start, channel, note in sorted(starts, key=lambda s: (s[0], s[1], s[2].pitch)):
        if note.program != program[channel]:
            program[channel] = note.program
            events.append((start, 1, bytes([0xC0 | channel, note.program & 0x7F])))
    ordered = [(float(time), 2, i.to_bytes(4, "big"), bytes(data)) for i, (data, time) in enumerate(controls)]
    # By time, then kind, then bytes (notes) or given order (controls): the same input, the same stream.
    merged = sorted([(time, kind, data, data) for time, kind, data in events] + ordered)
    return _spread_pileups([(data, time) for time, _, _, data in merged])


def _spread_pileups(messages: list[MidiMessage]) -> list[MidiMessage]:
    """Move events past pedalboard's per-timestamp limit on by nanoseconds (still the same sample)."""
    out: list[MidiMessage] = []
    run = 0
    for data, time in messages:
        run = run + 1 if out and time == messages[len(out) - 1][1] else 0
        out.append((data, time + run * 1e-9 if run >= MAX_EVENTS_PER_TIMESTAMP else time))
    return out


def messages_end(messages: Sequence[MidiMessage]) -> float:
    return max((t for _, t in messages), default=0.0)


# ---------------------------------------------------------------------------------------- parent side


class PluginHost:
    """A persistent worker process that loads and renders plugins (`default_host` serves a whole process).

    Requests are serialised (one plugin instance is never used by two threads). If the worker dies, the
    request fails with PluginCrash naming the plugin and role, and the next request starts a new worker.
    """

    def __init__(self, load_timeout: float = DEFAULT_LOAD_TIMEOUT) -> None:
        self.load_timeout = load_timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._sock: socket.socket | None = None  # the same socket as _conn, for passing file descriptors
        self._log: IO[bytes] | None = None
        self._generation = 0  # counts workers started, so that regions of a dead one are never handed back
        self._pid = os.getpid()  # a forked child must start its own worker, not talk to its parent's
        self._released: list[int] = []  # shared-memory regions whose arrays are gone, to tell the worker

    # -- public requests

    def render(self, spec: PluginSpec, messages: Sequence[MidiMessage], sample_rate: int,
               max_tail: float = DEFAULT_MAX_TAIL) -> np.ndarray:
        """Render MIDI through the plugin: float32 (frames, 2) from time 0 to the end of the tail.

        The array is a transposed view of channel-major data in memory shared with the worker (not
        C-contiguous), which numpy treats alike.
        """
        if not messages:
            return np.zeros((0, 2), dtype=np.float32)
        return self._request(("render", spec, list(messages), float(sample_rate), float(max_tail)), spec,
                             "rendering", audio=True)

    def info(self, spec: PluginSpec) -> PluginInfo:
        data = self._request(("info", spec), spec, "reading its parameters")
        params = tuple(ParameterInfo(**{**p, "choices": tuple(p["choices"])}) for p in data.pop("parameters"))
        return PluginInfo(**data, parameters=params)

    def capture_state(self, spec: PluginSpec, vstpreset: bool = False) -> bytes:
        """The plugin's state after applying `spec` (raw state, or .vstpreset bytes)."""
        return self._request(("state", spec, vstpreset), spec, "saving its state")

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __enter__(self) -> PluginHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing

    def _request(self, request: tuple, spec: PluginSpec, doing: str, audio: bool = False) -> Any:
        """Send one request; the answer comes as "loaded" (within the load timeout), then "ok" or "error".

        With `audio`, the "ok" payload is (frames, capacity, region): the worker wrote the samples into a
        shared-memory region, channel-major with rows `capacity` long, and passes its descriptor over the
        socket. The region is mapped, not copied;
        the returned array is its transpose, and once that array is gone the region goes back to the worker
        for reuse (its pages already exist, so the next render's copy costs no page faults).
        """
        with self._lock:
            conn = self._ensure_worker()
            if audio:
                released = []
                while self._released:  # pop, not copy-and-clear: a finalizer may append meanwhile
                    released.append(self._released.pop())
                request = (*request, released)
            try:
                conn.send(request)
            except OSError:
                raise self._crashed(spec, "loading") from None
            if not self._wait(conn, self.load_timeout):
                self._stop(kill=True)
                raise ChiptuneError(f"{spec.where()}: did not load within {self.load_timeout:g} s (load timeout)")
            status, payload = self._receive(spec, "loading")
            if status == "loaded":
                status, payload = self._receive(spec, doing)
            if status == "error":
                reason, parameter = payload
                raise ChiptuneError(f"{spec.where(parameter)}: {reason}")
            if not audio:
                return payload
            frames, capacity, region = payload
            self._wait(conn, None)
            assert self._sock is not None
            try:
                _, fds, _, _ = socket.recv_fds(self._sock, 1, 1)
            except OSError:
                fds = []
            if not fds:
                raise self._crashed(spec, doing)
            try:
                shared = mmap.mmap(fds[0], 2 * capacity * 4, flags=_MAP_FLAGS)
            finally:
                os.close(fds[0])
            # Every view of the samples keeps the mapping alive, so its end is when the region is free again.
            weakref.finalize(shared, self._release, self._generation, region)
            return np.frombuffer(shared, dtype=np.float32).reshape(2, capacity)[:, :frames].T

    def _release(self, generation: int, region: int) -> None:
        """Called when a rendered array is garbage: its region is reported with the next render request."""
        if generation == self._generation:
            self._released.append(region)  # list.append is atomic: finalizers may run on any thread

    def _receive(self, spec: PluginSpec, doing: str) -> tuple[str, Any]:
        conn = self._conn
        assert conn is not None
        self._wait(conn, None)
        try:
            return conn.recv()
        except (EOFError, OSError):
            raise self._crashed(spec, doing) from None

    def _wait(self, conn: Connection, timeout: float | None) -> bool:
        """Wait for the worker to answer or die; False if `timeout` passed first."""
        remaining = timeout
        while True:
            step = 0.5 if remaining is None else min(0.5, remaining)
            if conn.poll(step):
                return True
            if self._proc is None or self._proc.poll() is not None:
                return True  # EOF or a dead worker: the read that follows reports it
            if remaining is not None:
                remaining -= step
                if remaining <= 0:
                    return False

    def _crashed(self, spec: PluginSpec, doing: str) -> PluginCrash:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # the socket broke but the process lives on: end it
                proc.kill()
                code = proc.wait()
        self._stop()
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit status {code}"
        return PluginCrash(f"{spec.where()}: crashed while {doing} ({how})")

    def _ensure_worker(self) -> Connection:
        if self._pid != os.getpid():
            self._forget()
        if self._conn is not None and self._proc is not None and self._proc.poll() is None:
            return self._conn
        self._stop()
        self._generation += 1
        self._released.clear()
        parent_sock, child_sock = socket.socketpair()
        # The worker's output (plugins chatter on stderr) lives as long as the worker; kept for start errors.
        self._log = tempfile.TemporaryFile(prefix="chiptune-forge-plugins-")  # noqa: SIM115
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        fd = child_sock.fileno()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", f"from chiptune_forge.plugins import worker_main; worker_main({fd})"],
                pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env)
        finally:
            child_sock.close()
        self._sock = parent_sock
        self._conn = Connection(os.dup(parent_sock.fileno()))
        if not self._wait(self._conn, WORKER_START_TIMEOUT):
            self._stop(kill=True)
            raise ChiptuneError(f"the plugin host process did not start within {WORKER_START_TIMEOUT:g} s")
        try:
            self._conn.recv()
        except (EOFError, OSError):
            detail = self._log_tail()
            self._stop()
            raise ChiptuneError("the plugin host process failed to start"
                                + (f": {detail}" if detail else "")) from None
        return self._conn

    def _forget(self) -> None:
        """In a forked child: drop the parent's worker without stopping it (closing only our copies)."""
        for handle in (self._conn, self._sock, self._log):
            if handle is not None:
                handle.close()
        self._proc = self._conn = self._sock = self._log = None
        self._pid = os.getpid()

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""

    def _stop(self, kill: bool = False) -> None:
        proc, conn, sock = self._proc, self._conn, self._sock
        self._proc = self._conn = self._sock = None
        if sock is not None:
            sock.close()
        if conn is not None:
            if not kill and proc is not None and proc.poll() is None:
                try:
                    conn.send(("quit",))
                except OSError:
                    kill = True
            conn.close()
        if proc is not None:
            if kill:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


_default_host: PluginHost | None = None
_default_lock = threading.Lock()


def default_host() -> PluginHost:
    """The process-wide host: one worker serves every plugin role of every track a process renders."""
    global _default_host
    with _default_lock:
        if _default_host is None:
            _default_host = PluginHost()
            atexit.register(_default_host.close)
        return _default_host


def _after_fork_in_child() -> None:
    """A forked build worker gets a host of its own (its locks may have been held at the fork)."""
    global _default_host, _default_lock
    if _default_host is not None:
        _default_host._forget()
        _default_host._lock = threading.Lock()
    _default_host = None
    _default_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def render_role(spec: PluginSpec, notes: Sequence[Note], sample_rate: int, *,
                controls: Sequence[MidiMessage] = (), max_tail: float | None = None,
                host: PluginHost | None = None) -> np.ndarray:
    """One role through its plugin: float32 (frames, 2), sample 0 at time 0, ending after the tail (at
    most `max_tail` seconds after the last event; the spec's own cap if None)."""
    tail = spec.max_tail if max_tail is None else max_tail
    return (host or default_host()).render(spec, role_messages(notes, controls), sample_rate, tail)


def plugin_info(path: str, host: PluginHost | None = None) -> PluginInfo:
    spec = PluginSpec(resolve_plugin_path(path, Path.cwd()))
    return (host or default_host()).info(spec)


def format_info(info: PluginInfo) -> str:
    """The `plugins info` text: a header, then one line per parameter in the names presets use."""
    lines = [f"{info.name} ({info.kind})", f"path: {info.path}", f"latency: {info.latency_samples} samples",
             "parameters (preset name, type, range or choices, default):"]
    if not info.parameters:
        lines.append("  (none)")
    width = max((len(p.name) for p in info.parameters), default=0)
    for p in info.parameters:
        if p.type == "float":
            span = f"{_num(p.minimum)} .. {_num(p.maximum)}" + (f" {p.units}" if p.units else "")
        else:
            span = " | ".join(_text(c) for c in p.choices)
        notes = [p.label] if p.label.lower() != p.name.replace("_", " ").lower() else []
        if not p.automatable:
            notes.append("read-only or not automatable")
        note = f"  ({'; '.join(notes)})" if notes else ""
        lines.append(f"  {p.name:<{width}}  {p.type:<6}  {span}  default {_text(p.default)}{note}")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "?" if x is None else f"{x:g}"


def _text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_assignment(text: str) -> tuple[str, ParameterValue]:
    """`name=value` from the command line; the worker converts the value to the parameter's type."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ChiptuneError(f"--set expects name=value, got {text!r}")
    return name.strip(), value.strip()


def save_state(path: str, assignments: Sequence[str], output: Path, host: PluginHost | None = None) -> int:
    """Load a plugin, set parameters, and write its state for a preset's state_file (or preset_file)."""
    params = tuple(parse_assignment(a) for a in assignments)
    spec = PluginSpec(resolve_plugin_path(path, Path.cwd()), parameters=params)
    data = (host or default_host()).capture_state(spec, vstpreset=output.suffix.lower() == ".vstpreset")
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ChiptuneError(f"{output}: cannot write ({exc.strerror or exc})") from None
    return len(data)


# ---------------------------------------------------------------------------------------- worker side


class _Problem(Exception):
    """A plugin problem the worker reports as a one-line reason, with the parameter it is about if any (set
    where the parameters are applied)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.parameter: str | None = None


@dataclass
class _Instance:
    plugin: Any
    parameters: dict[str, Any]  # pedalboard's parameter objects by name (building that dict takes ms)
    channels: int = 2


@dataclass
class _Region:
    fd: int
    size: int
    mapping: mmap.mmap


class _Regions:
    """Shared-memory buffers that rendered audio is handed to the parent in, reused once it lets go.

    A fresh buffer costs a page fault per 4 KiB page on both sides (more than rendering a light plugin);
    a reused one costs only the copy of each rendered block into it.
    """

    def __init__(self) -> None:
        self.regions: dict[int, _Region] = {}
        self.free: set[int] = set()
        self.next_id = 0

    def release(self, ids: Iterable[int]) -> None:
        self.free |= set(ids) & self.regions.keys()
        while len(self.free) > SPARE_REGIONS:  # keep the largest spares
            smallest = min(self.free, key=lambda i: self.regions[i].size)
            self.free.discard(smallest)
            region = self.regions.pop(smallest)
            region.mapping.close()
            os.close(region.fd)

    def take(self, frames: int) -> tuple[int, int, np.ndarray]:
        """A free region for up to `frames` stereo frames (the smallest that fits, or a new one): its id,
        its descriptor and a channel-major float32 (2, frames) view of it."""
        size = 2 * frames * 4
        fits = [i for i in self.free if self.regions[i].size >= size]
        if fits:
            rid = min(fits, key=lambda i: self.regions[i].size)
            self.free.discard(rid)
        else:
            rid, self.next_id = self.next_id, self.next_id + 1
            self.regions[rid] = _new_region(max(size, 8))
        region = self.regions[rid]
        return rid, region.fd, np.frombuffer(region.mapping, dtype=np.float32, count=2 * frames).reshape(2, frames)


def _new_region(size: int) -> _Region:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("chiptune-forge-audio", os.MFD_CLOEXEC)
    else:
        fd, name = tempfile.mkstemp(prefix="chiptune-forge-audio-")
        os.unlink(name)
    os.ftruncate(fd, size)
    return _Region(fd, size, mmap.mmap(fd, size, flags=_MAP_FLAGS))


def worker_main(fd: int) -> None:
    """The worker's loop: answer requests until told to quit or the parent goes away."""
    os.set_inheritable(fd, False)  # processes a plugin starts must not hold the parent's socket open
    conn = Connection(fd)
    sock = socket.socket(fileno=os.dup(fd))
    conn.send(("ready", None))
    cache: OrderedDict[tuple, _Instance] = OrderedDict()
    regions = _Regions()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break
        if request[0] == "quit":
            break
        try:
            _serve(conn, sock, request, cache, regions)
        except Exception as exc:  # report it and keep serving: the instance cache stays warm
            conn.send(("error", (_reason(exc), getattr(exc, "parameter", None))))
    # Skip plugin destructors: some plugins assert or crash on teardown, and the process is ending anyway.
    sys.stdout.flush()
    os._exit(0)


def _serve(conn: Connection, sock: socket.socket, request: tuple, cache: OrderedDict[tuple, _Instance],
           regions: _Regions) -> None:
    kind, spec = request[0], request[1]
    if kind == "render":
        regions.release(request[-1])
    instance = _instance(spec, cache)
    conn.send(("loaded", None))
    plugin = instance.plugin
    if kind == "info":
        conn.send(("ok", _info(spec, plugin)))
    elif kind == "state":
        if not plugin.is_instrument:
            raise _Problem(NOT_AN_INSTRUMENT)
        # Parameter changes reach a VST3 processor (whose state this is) only while it processes audio.
        plugin([], duration=STATE_FLUSH_SECONDS, sample_rate=48000.0, reset=False)
        conn.send(("ok", bytes(plugin.preset_data if request[2] else plugin.raw_state)))
    elif kind == "render":
        _, _, messages, sample_rate, max_tail, _ = request
        if not plugin.is_instrument:
            raise _Problem(NOT_AN_INSTRUMENT)
        capacity = max_output_frames(instance, messages, sample_rate, max_tail)
        region, fd, out = regions.take(capacity)
        try:
            frames = render_with_tail(instance, messages, sample_rate, max_tail, out)
        except Exception:
            regions.release([region])  # the parent never sees this region: it is free again at once
            raise
        conn.send(("ok", (frames, capacity, region)))
        socket.send_fds(sock, [b"a"], [fd])
    else:
        raise _Problem(f"unknown request {kind!r}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _Problem):
        return str(exc)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    text = re.sub(r"^VST3Plugin: ", "", text)
    return text if isinstance(exc, ImportError | ValueError | RuntimeError) else f"{type(exc).__name__}: {text}"


def _cache_key(spec: PluginSpec) -> tuple:
    return (str(spec.path), spec.parameters, spec.state, spec.preset_data)


def _instance(spec: PluginSpec, cache: OrderedDict[tuple, _Instance]) -> _Instance:
    """The cached instance for this exact setup, or a newly loaded and configured one."""
    key = _cache_key(spec)
    instance = cache.get(key)
    if instance is not None:
        cache.move_to_end(key)
        return instance
    pedalboard = import_pedalboard()
    try:
        plugin = pedalboard.load_plugin(str(spec.path))
    except (ImportError, RuntimeError, ValueError) as exc:
        raise _Problem(f"cannot load ({_reason(exc)})") from None
    if spec.state is not None:
        try:
            plugin.raw_state = spec.state
        except (RuntimeError, ValueError) as exc:
            raise _Problem(f"state_file was refused ({_reason(exc)})") from None
    if spec.preset_data is not None:
        try:
            plugin.preset_data = spec.preset_data
        except (RuntimeError, ValueError) as exc:
            raise _Problem(f"preset_file was refused ({_reason(exc)})") from None
    instance = _Instance(plugin, dict(plugin.parameters))
    _apply_parameters(instance, spec)
    cache[key] = instance
    while len(cache) > INSTANCE_CACHE_SIZE:
        cache.popitem(last=False)
    return instance


def import_pedalboard() -> Any:
    """pedalboard, with DPF's MIDI-mapping parameters hidden like JUCE's (see _DPF_MIDI_PARAMETER)."""
    import pedalboard
    from pedalboard import _pedalboard

    ignored = getattr(_pedalboard, "PARAMETER_NAME_REGEXES_TO_IGNORE", None)
    if isinstance(ignored, set):
        ignored.add(_DPF_MIDI_PARAMETER)
    return pedalboard


RESTORED_LOWEST_RAW = 1e-6
NOT_AN_INSTRUMENT = "is an effect, not an instrument (a role needs a plugin that plays MIDI)"
_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}


def _apply_parameters(instance: _Instance, spec: PluginSpec) -> None:
    """Set the spec's parameters by name.

    After the spec's state or preset was restored the host's copy of each value is stale (it still holds the value from
    before the state), so setting that same value again would not reach the plugin: each parameter is
    moved away first. And there a change to exactly raw 0 is dropped too, so the lowest raw value is sent
    as RESTORED_LOWEST_RAW: the same choice of a switch or list, a negligible 1e-6 of a range."""
    known = instance.parameters
    restored = spec.state is not None or spec.preset_data is not None
    for name, value in spec.parameters:
        try:
            _apply_parameter(known, name, value, restored)
        except _Problem as exc:
            exc.parameter = name
            raise


def _apply_parameter(known: dict[str, Any], name: str, value: ParameterValue, restored: bool) -> None:
    param = known.get(name)
    if param is None:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise _Problem(f"unknown parameter {name!r} ({hint}parameters: {', '.join(known) or 'none'})")
    try:
        raw = param.get_raw_value_for(_coerce(name, param, value))
        if restored:
            param.raw_value = 0.75 if raw < 0.5 else 0.25  # away from the target, and not 0
            raw = max(raw, RESTORED_LOWEST_RAW)
        param.raw_value = raw
    except ValueError as exc:
        raise _Problem(f"parameter {name!r}: {_reason(exc)}") from None


def _coerce(name: str, param: Any, value: ParameterValue) -> ParameterValue:
    """Check a value against the parameter and convert command-line text to the parameter's type."""
    if param.type is bool:
        if isinstance(value, str):
            word = value.strip().lower()
            if word not in _TRUE | _FALSE:
                raise _Problem(f"parameter {name!r} is on/off, got {value!r}")
            return word in _TRUE
        return bool(value)
    if param.type is str:
        text = str(value)
        if text not in param.valid_values:
            choices = ", ".join(str(v) for v in param.valid_values)
            raise _Problem(f"parameter {name!r} must be one of {choices}, got {value!r}")
        return text
    if isinstance(value, bool):
        raise _Problem(f"parameter {name!r} expects a number, got {str(value).lower()}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _Problem(f"parameter {name!r} expects a number, got {value!r}") from None
    number = float(value)
    lo, hi = param.min_value, param.max_value
    if lo is not None and hi is not None and not lo - 1e-9 <= number <= hi + 1e-9:
        raise _Problem(f"parameter {name!r} must be within {lo:g}..{hi:g}, got {number:g}")
    return number


def _info(spec: PluginSpec, plugin: Any) -> dict[str, Any]:
    params = []
    for name, p in plugin.parameters.items():
        default = _default_value(p)
        if p.type is float:
            kind, choices = "float", ()
        else:
            kind, choices = ("bool" if p.type is bool else "choice"), tuple(p.valid_values)
        params.append(asdict(ParameterInfo(
            name=name, label=str(p.name), type=kind, default=default,
            minimum=p.min_value if p.type is float else None, maximum=p.max_value if p.type is float else None,
            units=str(p.label or ""), choices=choices, automatable=bool(p.is_automatable))))
    return {"name": str(plugin.name), "path": str(spec.path),
            "kind": "instrument" if plugin.is_instrument else "effect",
            "latency_samples": int(plugin.reported_latency_samples), "parameters": params}


def _default_value(param: Any) -> ParameterValue | None:
    """The default in the parameter's own units or choices.

    Read from the plugin's text for the default (exact) rather than from pedalboard's 1000-step table of
    values (which is what a preset's value snaps to when set).
    """
    from pedalboard._pedalboard import strip_common_float_suffixes

    raw = float(param.default_raw_value)
    text = str(param.get_text_for_raw_value(raw))
    if param.type is float:
        try:
            return float(strip_common_float_suffixes(text))
        except ValueError:
            pass
    elif param.type is str and text in param.valid_values:
        return text
    for (lo, hi), value in param.ranges.items():
        if lo <= raw <= hi:
            return value
    return None


def _timing(instance: _Instance, messages: Sequence[MidiMessage], sample_rate: float,
            max_tail: float) -> tuple[int, int, int, int]:
    """(latency, end, hold, cap) in frames of the plugin's output: `end` is the first frame after the last
    event, `cap` where the tail is cut at the latest."""
    latency = max(0, int(instance.plugin.reported_latency_samples))
    end = int(messages_end(messages) * sample_rate) + 1 + latency
    hold = max(1, round(SILENCE_HOLD * sample_rate))
    return latency, end, hold, end + max(0, round(max_tail * sample_rate))


def max_output_frames(instance: _Instance, messages: Sequence[MidiMessage], sample_rate: float,
                      max_tail: float) -> int:
    """The most frames `render_with_tail` can return (the tail running to its cap)."""
    latency, _, _, cap = _timing(instance, messages, sample_rate, max_tail)
    return cap - latency


def render_with_tail(instance: _Instance, messages: Sequence[MidiMessage], sample_rate: float,
                     max_tail: float, out: np.ndarray) -> int:
    """Render MIDI, then keep rendering until the output stays below -90 dBFS for 100 ms (or max_tail).

    The plugin's reported latency is rendered in addition and cut from the front, so sample 0 is time 0.
    The audio goes into `out`, channel-major (2, max_output_frames(...)), one block at a time while the
    block is still in cache; returns how many frames were written.
    """
    latency, end, hold, cap = _timing(instance, messages, sample_rate, max_tail)
    sink = _Sink(out, latency)
    _render_segments(instance, messages, end, sample_rate, sink)
    rendered = loud_end = end
    while rendered - loud_end < hold and rendered < cap:
        n = min(max(hold, round(TAIL_BLOCK * sample_rate)), cap - rendered)
        block = _render_block(instance, [], n, sample_rate, reset=False)
        loud = np.flatnonzero(np.max(np.abs(block), axis=0) > SILENCE_THRESHOLD)
        if loud.size:
            loud_end = rendered + int(loud[-1]) + 1
        sink.add(block)
        rendered += n
    return min(loud_end + hold, cap) - latency


class _Sink:
    """Rendered blocks, appended to an output array after dropping the first `skip` frames (the latency)."""

    def __init__(self, out: np.ndarray, skip: int) -> None:
        self.out = out
        self.skip = skip
        self.frames = 0

    def add(self, block: np.ndarray) -> None:
        drop = min(self.skip, block.shape[1])
        self.skip -= drop
        n = block.shape[1] - drop
        self.out[:, self.frames:self.frames + n] = block[:, drop:]
        self.frames += n


def _render_segments(instance: _Instance, messages: Sequence[MidiMessage], frames: int, sample_rate: float,
                     sink: _Sink) -> None:
    """The first `frames` frames, in calls that each start exactly at a control message, and are at most
    RENDER_CHUNK frames long (so that each block is copied on while it is in cache).

    JUCE hands a VST3 plugin its CCs, pitch bends and program changes as parameter changes at the start of
    a processing block, while notes keep their sample offsets; starting a new block at every control
    message's sample makes controls as sample-accurate as notes.
    """
    ordered = sorted(messages, key=lambda m: m[1])
    at = [int(t * sample_rate) for _, t in ordered]
    cuts = {f for (data, _), f in zip(ordered, at, strict=True)
            if data and data[0] & 0xF0 in _BLOCK_START_STATUSES and 0 < f < frames}
    cuts.update(range(RENDER_CHUNK, frames, RENDER_CHUNK))
    for i, (start, stop) in enumerate(itertools.pairwise([0, *sorted(cuts), frames])):
        offset = start / sample_rate
        lo, hi = bisect.bisect_left(at, start), bisect.bisect_left(at, stop)
        part = [(data, max(0.0, t - offset)) for data, t in ordered[lo:hi]]
        sink.add(_render_block(instance, part, stop - start, sample_rate, reset=i == 0))


def _render_block(instance: _Instance, messages: Sequence[MidiMessage], frames: int, sample_rate: float,
                  reset: bool) -> np.ndarray:
    """`frames` frames as (2, frames); mono plugins are doubled, extra channels beyond two dropped."""
    duration = (frames + 0.5) / sample_rate  # pedalboard truncates duration * sample_rate
    try:
        out = instance.plugin(messages, duration=duration, sample_rate=sample_rate,
                              num_channels=instance.channels, buffer_size=RENDER_BUFFER_SIZE, reset=reset)
    except ValueError as exc:
        found = re.search(r"produces (\d+)-channel output", str(exc))
        if found is None or int(found.group(1)) == instance.channels or int(found.group(1)) < 1:
            raise
        instance.channels = int(found.group(1))
        out = instance.plugin(messages, duration=duration, sample_rate=sample_rate,
                              num_channels=instance.channels, buffer_size=RENDER_BUFFER_SIZE, reset=reset)
    out = np.asarray(out, dtype=np.float32)
    if out.shape[0] == 1:
        out = np.repeat(out, 2, axis=0)
    if out.shape[1] != frames:
        raise _Problem(f"rendered {out.shape[1]} frames where {frames} were asked for")
    return out[:2]
