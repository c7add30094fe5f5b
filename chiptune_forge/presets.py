"""Render presets: TOML files that say which instrument plays each role, how it is voiced, the echo, effects.

A preset is checked completely before anything renders: an unknown key, a bad value or an unknown instrument
is reported on one line naming the preset file and the key, with a did-you-mean where one is close.

Shape (every table and key optional; missing roles and keys take the engine defaults)::

    description = "one line for `chiptune-forge presets`"
    [arrange]
    drums = true                      # add a rule-made drum part when the piece has none
    [roles.lead]                      # roles: lead, harmony, bass, drums
    instrument = "builtin:pulse50"    # the role's source (`chiptune-forge presets` lists them)
    adsr = [15, 5, 6, 12]             # attack 0-15, decay 0-7, sustain level 0-7, sustain rate 0-31
    # gain = "direct:100"             # or a GAIN mode instead of ADSR: direct:0-127, increase:R, bent:R
    release = 0                       # 0 = hardware key-off (8 ms); 1-31 = exponential fade at that rate
    volume = 0.5                      # 0-1
    pan = 0.0                         # -1 (left) .. 1 (right)
    octave = 0                        # -4..4
    echo = true                       # send this role to the echo unit (EON)
    [programs.33]                     # same keys as a role: tracks of a multi-track MIDI with program 33
    instrument = "builtin:bass"       # (keys left out stay as the track's role plays it)
    [echo]
    delay_ms = 64                     # 16..240 in steps of 16 (EDL)
    feedback = 0.3                    # -1..1 (EFB)
    fir = [127, 0, 0, 0, 0, 0, 0, 0]  # 8 signed 8-bit taps, first = oldest sample
    volume = 0.25                     # -1..1, or [left, right] (EVOL)
    [master]
    volume = 0.9                      # -1..1, or [left, right] (MVOL)
    [[effects]]                       # pedalboard effects run after the DSP, in order
    type = "Reverb"
    room_size = 0.3                   # pedalboard's own parameter names

A role's instrument is its *source*: a built-in sampler instrument (`builtin:NAME`), or a VST3 instrument
the user owns, rendered through pedalboard in a separate process to its own stem and mixed in (volume, pan,
octave and echo apply as for built-ins)::

    [roles.lead]
    plugin = "~/.vst3/Synth.vst3"     # a path (relative to this file; ~ and $VARS expand) or a bundle name
    parameters = { cutoff = 0.4 }     # by `chiptune-forge plugins info` names, in the plugin's own units
    state_file = "lead.bin"           # or preset_file = "lead.vstpreset" (`chiptune-forge plugins state`)
    max_tail = 10.0                   # seconds rendered at most after the last note (releases, reverb)
    [[roles.lead.effects]]            # pedalboard effects on this role's stem only
    type = "Chorus"
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ChiptuneError, did_you_mean
from .snes.dsp import Envelope
from .snes.echo import FIR_TAPS, MAX_EDL, EchoSettings
from .snes.instruments import BUILTIN_PREFIX, INSTRUMENTS, KIT_NAME, instrument_names

if TYPE_CHECKING:
    from .manifest import _Lines
    from .plugins import PluginSpec

ROLES = ("lead", "harmony", "bass", "drums")
DEFAULT_PRESET = "snes"
FINGERPRINT_VERSION = 1
ECHO_STEP_MS = 16
TOP_KEYS = ("description", "arrange", "roles", "programs", "echo", "master", "effects")
ROLE_KEYS = ("instrument", "adsr", "gain", "release", "volume", "pan", "octave", "echo")
PLUGIN_KEYS = ("plugin", "parameters", "preset_file", "state_file", "max_tail")
"""A plugin role's keys that say which plugin plays and how it is set up (read by plugins.preset_plugin)."""
PLUGIN_ROLE_KEYS = (*PLUGIN_KEYS, "effects", "volume", "pan", "octave", "echo")
ECHO_KEYS = ("delay_ms", "feedback", "fir", "volume")
GAIN_MODES = ("direct", "increase", "bent")
# Pedalboard classes that are containers or hosts, not effects a preset can name.
NOT_EFFECTS = {"Plugin", "Pedalboard", "Chain", "Mix", "PluginContainer", "ExternalPlugin", "VST3Plugin",
               "AudioUnitPlugin", "IIRFilter"}

# A role a preset leaves out plays at the default preset's level, which leaves the mix of all four headroom.
DEFAULT_ROLES: dict[str, dict[str, Any]] = {
    "lead": {"instrument": "builtin:pulse50", "volume": 0.2, "pan": 0.0, "octave": 0, "echo": True},
    "harmony": {"instrument": "builtin:strings", "volume": 0.1, "pan": 0.0, "octave": 0, "echo": True},
    "bass": {"instrument": "builtin:bass", "volume": 0.24, "pan": 0.0, "octave": 0, "echo": False},
    "drums": {"instrument": "builtin:kit", "volume": 0.2, "pan": 0.0, "octave": 0, "echo": False},
}


class PresetError(ChiptuneError):
    """A preset problem, located by file and dotted key (`roles.lead.volume`)."""

    def __init__(self, path: object, key: str, reason: str) -> None:
        super().__init__(f"{path}: {key}: {reason}" if key else f"{path}: {reason}")
        self.path, self.key, self.reason = path, key, reason


@dataclass(frozen=True)
class RoleSpec:
    """How one role (or one MIDI program) is played.

    `instrument` is the source, `builtin:NAME` (or `plugin:BUNDLE` when `plugin` is set); `envelope` is None
    for the drum kit, whose keys carry their own envelopes, and for plugins. `effects` run on a plugin
    role's stem alone.
    """

    instrument: str
    envelope: Envelope | None
    volume: float
    pan: float
    octave: int
    echo: bool
    plugin: PluginSpec | None = None
    effects: tuple[EffectSpec, ...] = ()

    @property
    def builtin_name(self) -> str:
        return self.instrument.removeprefix(BUILTIN_PREFIX)

    @property
    def is_kit(self) -> bool:
        return self.builtin_name == KIT_NAME

    def to_dict(self) -> dict[str, Any]:
        env = None
        if self.envelope is not None:
            e = self.envelope
            env = {"adsr": [e.attack, e.decay, e.sustain_level, e.sustain_rate],
                   "gain": list(e.gain) if e.gain else None, "release": e.release}
        out = {"instrument": self.instrument, "envelope": env, "volume": self.volume, "pan": self.pan,
               "octave": self.octave, "echo": self.echo}
        if self.plugin is not None:
            out["plugin"] = self.plugin.fingerprint()
            out["effects"] = [{"type": e.type, "params": dict(e.params)} for e in self.effects]
        return out


@dataclass(frozen=True)
class EffectSpec:
    """One pedalboard effect: its class name and constructor parameters (pedalboard's names)."""

    type: str
    params: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Preset:
    """A fully resolved preset (defaults filled in). Identity for caching is `fingerprint()`."""

    name: str
    path: Path | None
    description: str
    roles: Mapping[str, RoleSpec]
    programs: Mapping[int, Mapping[str, RoleSpec]] = field(default_factory=dict)  # program -> role -> spec
    echo: EchoSettings | None = None
    master_volume: tuple[int, int] = (127, 127)
    effects: tuple[EffectSpec, ...] = ()
    drums: bool = True

    def spec_for(self, role: str, program: int | None = None) -> RoleSpec:
        """The spec for a part: its program's entry when the preset maps that program (over its role's
        settings), else its role's."""
        if program is not None and program in self.programs:
            return self.programs[program][role]
        return self.roles[role]

    def to_dict(self) -> dict[str, Any]:
        """Everything that affects the sound, resolved (name, path and description left out)."""
        echo = None
        if self.echo is not None:
            echo = {"edl": self.echo.edl, "efb": self.echo.feedback, "fir": list(self.echo.fir),
                    "evol": list(self.echo.volume)}
        return {
            "version": FINGERPRINT_VERSION,
            "roles": {k: v.to_dict() for k, v in sorted(self.roles.items())},
            "programs": {str(k): {role: spec.to_dict() for role, spec in sorted(by_role.items())}
                         for k, by_role in sorted(self.programs.items())},
            "echo": echo,
            "mvol": list(self.master_volume),
            "effects": [{"type": e.type, "params": dict(e.params)} for e in self.effects],
            "drums": self.drums,
        }

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def fingerprint(self) -> str:
        """A stable hash of the resolved content: equal for presets that render identically."""
        import hashlib
        import json

        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ loading


def shipped_presets_dir() -> Path:
    """The folder holding the shipped preset files (the data package `chiptune_forge.preset_library`)."""
    from . import preset_library

    return Path(preset_library.__file__).parent


def shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_presets_dir().glob("*.toml"))


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every shipped preset, sorted by name."""
    return [(name, load_preset(name).description) for name in shipped_names()]


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.lower().endswith(".toml")


def load_preset(name_or_path: str | Path, base_dir: Path | None = None) -> Preset:
    """Load a shipped preset by name (`snes`) or a preset file by path, validated and resolved.

    A Path, or a string that contains a slash or ends in .toml, is a file; a relative one is taken from
    `base_dir` (for a preset named in a manifest, the manifest's folder) or else the working directory.
    """
    if isinstance(name_or_path, Path) or _looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        if not path.is_file():
            what = "a folder, not a preset file" if path.is_dir() else "preset file not found"
            if not path.exists() and path.stem in shipped_names() and not isinstance(name_or_path, Path):
                what += f" (the shipped preset is named {path.stem}, without .toml)"
            raise ChiptuneError(f"{path}: {what}")
        return parse_preset(path.read_bytes(), path.stem, path)
    name = str(name_or_path)
    path = shipped_presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise ChiptuneError(f"unknown preset {name!r}{did_you_mean(name, shipped_names())}; give a shipped name or "
                            "a path to a .toml file")
    return parse_preset(path.read_bytes(), name, path)


def parse_preset(data: bytes, name: str, path: Path | None) -> Preset:
    """Validate and resolve preset TOML (`path` is only used in messages and kept on the result); a
    problem is reported as FILE:LINE: key: reason."""
    where = path if path is not None else f"preset {name!r}"
    try:
        text = data.decode("utf-8-sig")  # editors on Windows may add a byte-order mark
    except UnicodeDecodeError as exc:
        raise PresetError(where, "", f"not UTF-8 text ({exc})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        from .manifest import toml_syntax_error

        raise ChiptuneError(toml_syntax_error(where, exc)) from None
    try:
        return _parse(doc, name, path, where, text)
    except PresetError as exc:
        if not exc.key or exc.path is not where:
            raise
        raise PresetError(f"{where}:{_line_of(_key_lines(text), exc.key)}", exc.key, exc.reason) from None


def _key_lines(text: str) -> _Lines:
    """Where each key of a preset's text sits (the manifest's scanner, loaded only when a line is asked for)."""
    from .manifest import _Lines

    return _Lines(text)


def _line_of(lines: _Lines, key: str) -> int:
    """The line of a dotted key as the validator names it (`roles.lead.volume`, `effects[1].type`): the
    key's own line, else its table's header."""
    parts = key.split(".")
    indexed = [i for i, part in enumerate(parts) if part.endswith("]") and "[" in part]
    if indexed:
        k = indexed[-1]
        table, _, index = parts[k][:-1].partition("[")
        table, index, rest = ".".join([*parts[:k], table]), int(index), parts[k + 1:]
    else:
        table, index, rest = ".".join(parts[:-1]), 0, parts[-1:]
    if rest and (table, index, rest[0]) in lines.keys:
        return lines.keys[(table, index, rest[0])]
    if (key, 0) in lines.tables:  # the key names a table
        return lines.tables[(key, 0)]
    return lines.of(table, index)


def _parse(doc: dict, name: str, path: Path | None, where: object, text: str) -> Preset:
    v = _Validator(where, path.parent if path is not None else None, text)
    v.keys(doc, TOP_KEYS, "")
    description = v.string(doc, "description", "", "")
    arrange = v.table(doc, "arrange", "")
    v.keys(arrange, ("drums",), "arrange")
    drums = v.boolean(arrange, "drums", "arrange", True)
    roles_doc = v.table(doc, "roles", "")
    v.keys(roles_doc, ROLES, "roles")
    roles = {role: v.role(v.table(roles_doc, role, "roles"), f"roles.{role}", DEFAULT_ROLES[role])
             for role in ROLES}
    programs = {}
    for key, table in v.table(doc, "programs", "").items():
        if not (key.isdigit() and 0 <= int(key) <= 127):
            raise PresetError(where, f"programs.{key}", "a MIDI program number 0-127 is expected")
        if not isinstance(table, dict):
            raise PresetError(where, f"programs.{key}", "expected a table of role keys")
        v.keys(table, tuple(dict.fromkeys((*ROLE_KEYS, *PLUGIN_ROLE_KEYS))), f"programs.{key}")
        programs[int(key)] = {role: v.program_entry(table, f"programs.{key}", roles[role]) for role in ROLES}
    echo = v.echo(doc)
    master = v.table(doc, "master", "")
    v.keys(master, ("volume",), "master")
    master_volume = v.stereo_volume(master, "volume", "master", 0.9)
    effects = v.effects(doc.get("effects", []))
    return Preset(name, path, description, roles, programs, echo, master_volume, effects, drums)


class _Validator:
    """Reads values out of the parsed TOML, raising PresetError at the first problem."""

    def __init__(self, where: object, folder: Path | None, text: str) -> None:
        self.where = where
        self.folder = folder
        self.text = text  # for the lines of problems found later, when a plugin loads

    def fail(self, key: str, reason: str) -> PresetError:
        return PresetError(self.where, key, reason)

    @staticmethod
    def _join(prefix: str, key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    def keys(self, table: dict, allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(self._join(prefix, key), f"unknown key{did_you_mean(key, allowed)}; "
                                                         f"expected one of {', '.join(allowed)}")

    def table(self, doc: dict, key: str, prefix: str) -> dict:
        value = doc.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(self._join(prefix, key), f"expected a table, got {value!r}")
        return value

    def string(self, doc: dict, key: str, prefix: str, default: str) -> str:
        value = doc.get(key, default)
        if not isinstance(value, str):
            raise self.fail(self._join(prefix, key), f"expected a string, got {value!r}")
        return value

    def boolean(self, doc: dict, key: str, prefix: str, default: bool) -> bool:
        value = doc.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(self._join(prefix, key), f"expected true or false, got {value!r}")
        return value

    def number(self, doc: dict, key: str, prefix: str, default: float, lo: float, hi: float,
               integer: bool = False) -> float:
        value = doc.get(key, default)
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            kind = "an integer" if integer else "a number"
            raise self.fail(self._join(prefix, key), f"expected {kind} from {lo} to {hi}, got {value!r}")
        if not lo <= value <= hi:
            raise self.fail(self._join(prefix, key), f"{value!r} is out of range {lo}..{hi}")
        return value

    def stereo_volume(self, doc: dict, key: str, prefix: str, default: float) -> tuple[int, int]:
        """A volume in -1..1 (or [left, right]) as signed 8-bit register values."""
        value = doc.get(key, default)
        pair = value if isinstance(value, list) else [value, value]
        if len(pair) != 2:
            raise self.fail(self._join(prefix, key), f"expected a number or [left, right], got {value!r}")
        regs = []
        for side in pair:
            regs.append(round(127 * self.number({key: side}, key, prefix, default, -1.0, 1.0)))
        return regs[0], regs[1]

    def role(self, table: dict, prefix: str, defaults: dict[str, Any]) -> RoleSpec:
        if "plugin" in table:
            return self.plugin_role(table, prefix, defaults)
        for key in PLUGIN_ROLE_KEYS:
            if key in table and key not in ROLE_KEYS:
                raise self.fail(f"{prefix}.{key}", "only for a plugin role (set plugin = \"Synth.vst3\")")
        self.keys(table, ROLE_KEYS, prefix)
        instrument = self.string(table, "instrument", prefix, defaults["instrument"])
        names = instrument_names()
        if instrument not in names:
            spelled = instrument if ":" in instrument else BUILTIN_PREFIX + instrument
            raise self.fail(f"{prefix}.instrument", f"unknown instrument {instrument!r}"
                                                    f"{did_you_mean(spelled, names)}")
        kit = instrument == BUILTIN_PREFIX + KIT_NAME
        if kit and ("adsr" in table or "gain" in table or "release" in table):
            key = next(k for k in ("adsr", "gain", "release") if k in table)
            raise self.fail(f"{prefix}.{key}", "the drum kit sets its own envelope per drum")
        default = None if kit else INSTRUMENTS[instrument.removeprefix(BUILTIN_PREFIX)].envelope
        if default is not None and instrument == defaults["instrument"] and defaults.get("envelope") is not None:
            default = defaults["envelope"]  # a program entry on the role's own instrument keeps its envelope
        envelope = None if default is None else self.envelope(table, prefix, default)
        return RoleSpec(
            instrument=instrument,
            envelope=envelope,
            volume=float(self.number(table, "volume", prefix, defaults["volume"], 0.0, 1.0)),
            pan=float(self.number(table, "pan", prefix, defaults["pan"], -1.0, 1.0)),
            octave=int(self.number(table, "octave", prefix, defaults["octave"], -4, 4, integer=True)),
            echo=self.boolean(table, "echo", prefix, defaults["echo"]),
        )

    def program_entry(self, table: dict, prefix: str, role: RoleSpec) -> RoleSpec:
        """A [programs.N] entry over the role its track plays: what it leaves out stays as the role plays
        it. Without its own instrument or plugin it changes only the mix (volume, pan, octave, echo) of a
        role whose source has no envelope to set (the drum kit, a plugin)."""
        defaults = {"instrument": role.instrument, "envelope": role.envelope, "volume": role.volume,
                    "pan": role.pan, "octave": role.octave, "echo": role.echo}
        if "instrument" in table or "plugin" in table or (role.plugin is None and not role.is_kit):
            return self.role(table, prefix, defaults)
        # Checked here too, so a mistake is reported whatever the other roles are.
        for key in PLUGIN_ROLE_KEYS:
            if key in table and key not in ROLE_KEYS:
                raise self.fail(f"{prefix}.{key}", "only for a plugin role (set plugin = \"Synth.vst3\")")
        self.envelope(table, prefix, Envelope())
        return replace(role,
                       volume=float(self.number(table, "volume", prefix, role.volume, 0.0, 1.0)),
                       pan=float(self.number(table, "pan", prefix, role.pan, -1.0, 1.0)),
                       octave=int(self.number(table, "octave", prefix, role.octave, -4, 4, integer=True)),
                       echo=self.boolean(table, "echo", prefix, role.echo))

    def plugin_role(self, table: dict, prefix: str, defaults: dict[str, Any]) -> RoleSpec:
        """A role played by a VST3 instrument: the bundle is found and checked now, loaded when rendering."""
        if "instrument" in table:
            raise self.fail(f"{prefix}.instrument", "give instrument or plugin, not both")
        self.keys(table, PLUGIN_ROLE_KEYS, prefix)
        # Only here: a preset of built-in instruments never loads the plugin host's modules.
        from .plugins import PluginSettingError, preset_plugin

        try:
            plugin = preset_plugin(table, f"{self.where}: {prefix}", self.folder)
        except PluginSettingError as exc:  # located like every other preset problem (by its key, then its line)
            raise self.fail(self._join(prefix, exc.key), exc.reason) from None
        # A parameter the plugin turns out not to have is only found when it loads: its line is kept for then
        # (where the line scan finds it; a dotted or quoted key falls back to the role).
        key_lines = _key_lines(self.text)
        origins = tuple((name, f"{self.where}:{line}: {prefix}.parameters.{name}") for name, _ in plugin.parameters
                        if (line := key_lines.find(f"{prefix}.parameters", 0, name)) is not None)
        plugin = replace(plugin, parameter_origins=origins)
        return RoleSpec(
            instrument=f"plugin:{plugin.path.name}",
            envelope=None,
            volume=float(self.number(table, "volume", prefix, defaults["volume"], 0.0, 1.0)),
            pan=float(self.number(table, "pan", prefix, defaults["pan"], -1.0, 1.0)),
            octave=int(self.number(table, "octave", prefix, defaults["octave"], -4, 4, integer=True)),
            echo=self.boolean(table, "echo", prefix, defaults["echo"]),
            plugin=plugin,
            effects=self.effects(table.get("effects", []), f"{prefix}.effects"),
        )

    def envelope(self, table: dict, prefix: str, default: Envelope) -> Envelope:
        if "adsr" in table and "gain" in table:
            raise self.fail(f"{prefix}.gain", "give either adsr or gain, not both")
        release = int(self.number(table, "release", prefix, default.release, 0, 31, integer=True))
        if "adsr" in table:
            value = table["adsr"]
            limits = ((0, 15), (0, 7), (0, 7), (0, 31))
            if not (isinstance(value, list) and len(value) == 4):
                raise self.fail(f"{prefix}.adsr", f"expected [attack, decay, sustain_level, sustain_rate], "
                                                  f"got {value!r}")
            fields = [int(self.number({"adsr": x}, "adsr", prefix, 0, lo, hi, integer=True))
                      for x, (lo, hi) in zip(value, limits, strict=True)]
            return Envelope(*fields, gain=None, release=release)
        if "gain" in table:
            return Envelope(gain=self.gain(table["gain"], f"{prefix}.gain"), release=release)
        return Envelope(default.attack, default.decay, default.sustain_level, default.sustain_rate,
                        default.gain, release)

    def gain(self, value: Any, key: str) -> tuple[str, int]:
        match = re.fullmatch(r"(\w+):(\d+)", value) if isinstance(value, str) else None
        if match is None:
            raise self.fail(key, f"expected \"direct:0-127\", \"increase:1-31\" or \"bent:1-31\", got {value!r}")
        mode, amount = match.group(1), int(match.group(2))
        if mode not in GAIN_MODES:
            raise self.fail(key, f"unknown GAIN mode {mode!r}{did_you_mean(mode, GAIN_MODES)} (decrease "
                                 f"modes would be silent: a key-on starts the envelope at 0)")
        top = 127 if mode == "direct" else 31
        low = 0 if mode == "direct" else 1
        if not low <= amount <= top:
            raise self.fail(key, f"{mode} takes {low}..{top}, got {amount}")
        return mode, amount

    def echo(self, doc: dict) -> EchoSettings | None:
        if "echo" not in doc:
            return None
        table = self.table(doc, "echo", "")
        self.keys(table, ECHO_KEYS, "echo")
        if "delay_ms" not in table:
            raise self.fail("echo.delay_ms", "missing (16..240 in steps of 16)")
        delay = int(self.number(table, "delay_ms", "echo", 0, ECHO_STEP_MS, ECHO_STEP_MS * MAX_EDL,
                                integer=True))
        if delay % ECHO_STEP_MS:
            near = min(max(round(delay / ECHO_STEP_MS), 1), MAX_EDL) * ECHO_STEP_MS
            raise self.fail("echo.delay_ms", f"{delay} is not a multiple of {ECHO_STEP_MS} ms (did you mean "
                                             f"{near}?)")
        feedback = round(127 * self.number(table, "feedback", "echo", 0.0, -1.0, 1.0))
        fir = table.get("fir", [127] + [0] * (FIR_TAPS - 1))
        if not (isinstance(fir, list) and len(fir) == FIR_TAPS):
            raise self.fail("echo.fir", f"expected a list of {FIR_TAPS} integers -128..127, got {fir!r}")
        taps = tuple(int(self.number({"fir": c}, "fir", "echo", 0, -128, 127, integer=True)) for c in fir)
        volume = self.stereo_volume(table, "volume", "echo", 0.25)
        return EchoSettings(delay // ECHO_STEP_MS, feedback, taps, volume)

    def effects(self, items: Any, prefix: str = "effects") -> tuple[EffectSpec, ...]:
        if not isinstance(items, list):
            raise self.fail(prefix, f"expected [[{prefix}]] tables")
        if not items:
            return ()
        import pedalboard

        kinds = sorted(n for n in dir(pedalboard) if n not in NOT_EFFECTS and isinstance(
            getattr(pedalboard, n), type) and issubclass(getattr(pedalboard, n), pedalboard.Plugin))
        out = []
        for i, item in enumerate(items):
            key = f"{prefix}[{i}]"
            if not isinstance(item, dict):
                raise self.fail(key, "expected a table with a type")
            kind = item.get("type")
            if kind is None:
                for name in item:
                    if did_you_mean(name, ["type"]):
                        raise self.fail(f"{key}.{name}", "unknown key (did you mean 'type'?)")
                raise self.fail(f"{key}.type", "missing: the pedalboard effect to use, e.g. type = \"Reverb\"")
            if kind not in kinds:
                raise self.fail(f"{key}.type", f"unknown effect {kind!r}{did_you_mean(str(kind), kinds)}")
            cls = getattr(pedalboard, kind)
            types = effect_parameters(cls)
            allowed = sorted(types)
            params = []
            for name, value in item.items():
                if name == "type":
                    continue
                if name not in allowed:
                    raise self.fail(f"{key}.{name}", f"unknown parameter for {kind}"
                                                     f"{did_you_mean(name, allowed)}")
                if isinstance(value, str) and name.endswith("_filename"):
                    if self.folder is not None:
                        value = str((self.folder / value).resolve())
                    if not Path(value).is_file():
                        raise self.fail(f"{key}.{name}", f"no such file: {value}")
                if not isinstance(value, bool | int | float | str):
                    raise self.fail(f"{key}.{name}", f"expected a number, true/false or a string, got {value!r}")
                if types[name] in ("float", "int") and (isinstance(value, bool | str) or not math.isfinite(value)):
                    raise self.fail(f"{key}.{name}", f"expected a finite number, got {value!r}")
                choices = _enum_members(types[name])
                if choices is not None and value not in choices:
                    raise self.fail(f"{key}.{name}", f"unknown choice {value!r}{did_you_mean(str(value), choices)}; "
                                                     f"expected one of {', '.join(choices)}")
                params.append((name, value))
            spec = EffectSpec(kind, tuple(params))
            self.construct(key, spec)
            out.append(spec)
        return tuple(out)

    def construct(self, key: str, spec: EffectSpec) -> None:
        """Build the effect once, so pedalboard's own checks (ranges, files) run now. A failure is put on
        the parameter without which the effect builds, when there is one, else on the effect."""
        failure = _construction_error(spec)
        if failure is None:
            return
        for i, (name, _) in enumerate(spec.params):
            if _construction_error(EffectSpec(spec.type, spec.params[:i] + spec.params[i + 1:])) is None:
                raise self.fail(f"{key}.{name}", f"{spec.type}: {failure}")
        raise self.fail(key, f"{spec.type}: {failure}")


def _construction_error(spec: EffectSpec) -> str | None:
    try:
        make_effect(spec)
    except (TypeError, ValueError, RuntimeError) as exc:
        return str(exc).splitlines()[0]
    return None


def effect_parameters(cls: type) -> dict[str, str]:
    """Constructor parameter names of a pedalboard effect and their declared types ("float", "bool",
    "Union[...]", ...), read from its signature text (the native classes have no inspectable signature)."""
    doc = (cls.__init__.__doc__ or "\n").splitlines()[0]
    return {name: kind for name, kind in re.findall(r"(?:\(|, )(\w+): ([\w.]+(?:\[[^\]]*\])?)", doc) if name != "self"}


def _enum_type(declared: str) -> Any:
    """The pedalboard enum a parameter is declared as ("pedalboard_native.Resample.Quality"), else None."""
    import pedalboard

    parts = declared.split(".")
    owner = getattr(pedalboard, parts[-2], None) if len(parts) >= 2 else None
    enum = getattr(owner, parts[-1], None)
    return enum if isinstance(getattr(enum, "__members__", None), dict) else None


def _enum_members(declared: str) -> list[str] | None:
    """The names a preset may give for an enum parameter (Resample's quality: "ZeroOrderHold", ...)."""
    enum = _enum_type(declared)
    return None if enum is None else list(enum.__members__)


def make_effect(spec: EffectSpec) -> Any:
    """A fresh pedalboard plugin for the spec; a string given for an enum parameter (such as Resample's
    quality "ZeroOrderHold") becomes that member."""
    import pedalboard

    cls = getattr(pedalboard, spec.type)
    types = effect_parameters(cls)
    kwargs = {}
    for name, value in spec.params:
        enum = _enum_type(types.get(name, ""))
        kwargs[name] = enum.__members__[value] if enum is not None and value in enum.__members__ else value
    return cls(**kwargs)
