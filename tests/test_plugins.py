"""VST3 hosting through pedalboard, against real plugins built from tests/fixtures/ with DPF.

ForgeTestSynth (polyphonic pulse/triangle/saw, with a fixed 96-sample reported latency) and ForgeTestEffect
(a gain) are built once into build/test-plugins/; renders go through one worker process per module.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from chiptune_forge import plugins
from chiptune_forge.cli import main
from chiptune_forge.errors import ChiptuneError
from chiptune_forge.midi import Note, Piece
from chiptune_forge.plugins import PluginCrash, PluginHost, plugin_spec, render_role, role_messages

SR = 32000
LATENCY = 96  # what ForgeTestSynth reports (and delays its output by)
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_plugins", FIXTURES / "build_plugins.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bundles() -> dict[str, Path]:
    builder = _load_builder()
    try:
        return builder.build_test_plugins()
    except builder.ToolchainMissing as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def synth(bundles: dict[str, Path]) -> Path:
    return bundles["ForgeTestSynth"]


@pytest.fixture(scope="module")
def host() -> Iterator[PluginHost]:
    with PluginHost() as h:
        yield h


def spec(synth: Path, role: str = "lead", **parameters: object):
    return plugin_spec(str(synth), origin=f"song.toml: role {role}", parameters=parameters)


def onsets(audio: np.ndarray, gap: int = 200) -> list[int]:
    """Frames where sound starts after at least `gap` silent frames."""
    loud = np.flatnonzero(np.max(np.abs(audio), axis=1) > 1e-4)
    return [int(f) for i, f in enumerate(loud) if i == 0 or f - loud[i - 1] > gap]


def peak_hz(segment: np.ndarray, sample_rate: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment))))
    return float(np.argmax(spectrum) * sample_rate / len(segment))


# ------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("sample_rate", [32000, 44100])
def test_onsets_land_on_their_sample_with_latency_compensated(synth: Path, host: PluginHost,
                                                              sample_rate: int) -> None:
    times = [0.1, 0.2371, 0.50003, 0.777, 1.25]
    notes = [Note(60 + i, 100, t, t + 0.03) for i, t in enumerate(times)]
    audio = render_role(spec(synth, release_s=0.005), notes, sample_rate, host=host)
    found = onsets(audio)
    assert len(found) == len(times)
    for frame, t in zip(found, times, strict=True):
        assert abs(frame - t * sample_rate) <= 0.001 * sample_rate  # the issue's +-1 ms
        assert abs(frame - t * sample_rate) <= 1  # and in fact to the sample: the 96-frame latency is gone


def test_parameters_change_the_sound(synth: Path, host: PluginHost) -> None:
    notes = [Note(57, 100, 0.0, 0.5)]
    default = render_role(spec(synth), notes, SR, host=host)
    narrow = render_role(spec(synth, duty=0.25), notes, SR, host=host)
    saw = render_role(spec(synth, waveform="saw"), notes, SR, host=host)
    assert not np.array_equal(default, narrow) and not np.array_equal(default, saw)
    held = slice(LATENCY + 100, int(0.45 * SR))
    assert np.mean(default[held, 0] > 0) == pytest.approx(0.5, abs=0.02)
    assert np.mean(narrow[held, 0] > 0) == pytest.approx(0.25, abs=0.02)
    long_release = render_role(spec(synth, release_s=1.0), notes, SR, host=host)
    assert len(long_release) > len(default) + 0.7 * SR


def test_saved_state_and_vstpreset_restore_identically(synth: Path, host: PluginHost, tmp_path: Path) -> None:
    notes = [Note(64, 90, 0.05, 0.4), Note(67, 90, 0.2, 0.6)]
    configured = spec(synth, waveform="triangle", duty=0.3, release_s=0.4)
    expected = render_role(configured, notes, SR, host=host)
    (tmp_path / "lead.bin").write_bytes(host.capture_state(configured))
    (tmp_path / "lead.vstpreset").write_bytes(host.capture_state(configured, vstpreset=True))
    from_state = plugin_spec(str(synth), base_dir=tmp_path, origin="x", state_file="lead.bin")
    from_preset = plugin_spec(str(synth), base_dir=tmp_path, origin="x", preset_file="lead.vstpreset")
    assert np.array_equal(render_role(from_state, notes, SR, host=host), expected)
    assert np.array_equal(render_role(from_preset, notes, SR, host=host), expected)
    plain = render_role(spec(synth), notes, SR, host=host)
    n = min(len(plain), len(expected))
    assert not np.array_equal(plain[:n], expected[:n])


@pytest.mark.parametrize("kind", ["state_file", "preset_file"])
def test_parameters_apply_over_a_saved_state_even_at_their_default(synth: Path, host: PluginHost, tmp_path: Path,
                                                                    kind: str) -> None:
    notes = [Note(64, 90, 0.05, 0.4)]
    saved = spec(synth, waveform="triangle", duty=0.3, release_s=0.4)
    name = "lead.bin" if kind == "state_file" else "lead.vstpreset"
    (tmp_path / name).write_bytes(host.capture_state(saved, vstpreset=kind == "preset_file"))
    defaults = {"waveform": "pulse", "duty": 0.5}  # the plugin's own defaults, which the state had changed
    over = plugin_spec(str(synth), base_dir=tmp_path, origin="x", parameters=defaults, **{kind: name})
    expected = render_role(spec(synth, release_s=0.4, **defaults), notes, SR, host=host)
    assert np.array_equal(render_role(over, notes, SR, host=host), expected)


def test_a_chord_sounds_every_note(synth: Path, host: PluginHost) -> None:
    pitches = [60, 64, 67]
    chord = render_role(spec(synth, waveform="triangle"), [Note(p, 100, 0.1, 0.9) for p in pitches], SR,
                        host=host)
    alone = [render_role(spec(synth, waveform="triangle"), [Note(p, 100, 0.1, 0.9)], SR, host=host)
             for p in pitches]
    mixed = np.zeros((max(len(a) for a in [chord, *alone]), 2), dtype=np.float32)
    for a in alone:
        mixed[: len(a)] += a
    assert np.allclose(mixed[: len(chord)], chord, atol=1e-5)  # voices add up: nothing was dropped or stolen
    spectrum = np.abs(np.fft.rfft(chord[int(0.2 * SR):int(0.8 * SR), 0]))
    hz = np.fft.rfftfreq(int(0.6 * SR), 1 / SR)
    for p in pitches:
        f = 440 * 2 ** ((p - 69) / 12)
        near = (hz > f * 0.98) & (hz < f * 1.02)
        assert spectrum[near].max() > 0.3 * spectrum.max()


def test_release_tail_is_rendered_until_silence_and_capped(synth: Path, host: PluginHost) -> None:
    notes = [Note(60, 100, 0.1, 0.3)]
    audio = render_role(spec(synth, release_s=0.5), notes, SR, host=host)
    last_sound = int(np.flatnonzero(np.max(np.abs(audio), axis=1) > 10 ** (-90 / 20))[-1])
    assert last_sound == pytest.approx(0.8 * SR, abs=0.01 * SR)  # note-off + 0.5 s release
    assert len(audio) == last_sound + 1 + int(0.1 * SR)  # then 100 ms below -90 dBFS
    assert np.abs(audio[int(0.7 * SR)]).max() > 0.01  # deep in the release, still sounding
    capped = render_role(spec(synth, release_s=0.5), notes, SR, max_tail=0.2, host=host)
    assert len(capped) == int(0.3 * SR) + 1 + int(0.2 * SR)


def test_same_midi_renders_identically_and_instances_reset_between_renders(synth: Path, host: PluginHost) -> None:
    a_notes = [Note(60, 100, 0.0, 0.3), Note(72, 80, 0.1, 0.2)]
    b_notes = [Note(48, 127, 0.0, 2.0)]  # ends without release: a leftover voice would leak into the next render
    setup = spec(synth, release_s=2.0)
    first = render_role(setup, a_notes, SR, host=host)
    render_role(setup, b_notes, SR, max_tail=0.0, host=host)
    assert np.array_equal(render_role(setup, a_notes, SR, host=host), first)


def test_rendered_arrays_stay_intact_while_their_shared_memory_is_reused(synth: Path, host: PluginHost) -> None:
    a_notes, b_notes = [Note(60, 100, 0.0, 0.5)], [Note(67, 100, 0.0, 0.5)]
    a = render_role(spec(synth), a_notes, SR, host=host)
    a_copy = a.copy()
    b = render_role(spec(synth), b_notes, SR, host=host)  # `a` is alive: its memory must not be reused
    assert np.array_equal(a, a_copy) and not np.array_equal(a, b)
    b_copy = b.copy()
    del a
    gc.collect()
    again = render_role(spec(synth), a_notes, SR, host=host)  # may reuse a's memory, never b's
    assert np.array_equal(again, a_copy) and np.array_equal(b, b_copy)


def test_sustain_pedal_and_pitch_bend_reach_the_plugin(synth: Path, host: PluginHost) -> None:
    setup = spec(synth, waveform="triangle", release_s=0.005)
    note = [Note(69, 100, 0.1, 0.3)]
    pedal = [(bytes([0xB0, 64, 127]), 0.05), (bytes([0xB0, 64, 0]), 0.7)]
    plain = render_role(setup, note, SR, host=host)
    held = render_role(setup, note, SR, controls=pedal, host=host)
    assert len(plain) == pytest.approx(0.405 * SR, abs=0.002 * SR)  # note-off, 5 ms release, 100 ms quiet
    assert np.abs(held[int(0.5 * SR):int(0.69 * SR)]).max() > 0.1
    assert np.abs(held[int(0.71 * SR):]).max() == 0 and len(held) == pytest.approx(0.805 * SR, abs=0.002 * SR)

    bend = [(bytes([0xE0, 0x7F, 0x7F]), 0.5)]  # full up: +2 semitones
    bent = render_role(setup, [Note(69, 100, 0.0, 1.0)], SR, controls=bend, host=host)
    before, after = peak_hz(bent[int(0.1 * SR):int(0.45 * SR), 0]), peak_hz(bent[int(0.55 * SR):int(0.95 * SR), 0])
    assert before == pytest.approx(440, rel=0.01)
    assert after == pytest.approx(440 * 2 ** (2 / 12), rel=0.01)


def test_a_crashing_plugin_is_reported_and_the_host_recovers(synth: Path, host: PluginHost) -> None:
    notes = [Note(60, 100, 0.1, 0.2)]
    with pytest.raises(PluginCrash) as info:
        render_role(spec(synth, role="bass", crash=1.0), notes, SR, host=host)
    message = str(info.value)
    assert "song.toml: role bass" in message and "ForgeTestSynth.vst3" in message and "SIGSEGV" in message
    assert "\n" not in message
    assert len(render_role(spec(synth), notes, SR, host=host)) > 0.2 * SR


def _render_with_default_host(synth: Path) -> tuple[int, int]:
    """Frames rendered and the pid of the worker that rendered them."""
    frames = len(render_role(spec(synth), [Note(60, 100, 0.0, 0.2)], SR))
    worker = plugins.default_host()._proc
    assert worker is not None
    return frames, worker.pid


def test_a_forked_build_worker_gets_its_own_plugin_host(synth: Path, cli_host: PluginHost) -> None:
    frames, worker = _render_with_default_host(synth)  # the module's host is the default one here
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child_frames, child_worker = pool.apply(_render_with_default_host, (synth,))
    assert child_frames == frames and child_worker != worker
    assert _render_with_default_host(synth) == (frames, worker)


def test_load_timeout_is_one_clear_line(synth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_TEST_SYNTH_HANG_ON_LOAD", "1")
    with PluginHost(load_timeout=1.5) as slow, pytest.raises(ChiptuneError, match=r"role lead: plugin .*did not "
                                                                                  r"load within 1.5 s"):
        render_role(spec(synth), [Note(60, 100, 0.0, 0.1)], SR, host=slow)


# -------------------------------------------------------------------------------------- loading checks


def test_an_effect_is_refused_where_an_instrument_is_needed(bundles: dict[str, Path], host: PluginHost) -> None:
    effect = plugin_spec(str(bundles["ForgeTestEffect"]), origin="song.toml: role harmony")
    with pytest.raises(ChiptuneError, match=r"song.toml: role harmony: plugin .*ForgeTestEffect.vst3: is an "
                                            r"effect, not an instrument"):
        render_role(effect, [Note(60, 100, 0.0, 0.1)], SR, host=host)
    with pytest.raises(ChiptuneError, match=r"ForgeTestEffect.vst3: is an effect, not an instrument"):
        host.capture_state(effect)


def test_unknown_parameters_and_bad_values_name_the_role(synth: Path, host: PluginHost) -> None:
    notes = [Note(60, 100, 0.0, 0.1)]
    with pytest.raises(ChiptuneError, match=r"role lead: .*unknown parameter 'dutty' \(did you mean 'duty'\?"):
        render_role(spec(synth, dutty=0.3), notes, SR, host=host)
    with pytest.raises(ChiptuneError, match=r"'duty' must be within 0.05..0.95, got 3"):
        render_role(spec(synth, duty=3), notes, SR, host=host)
    with pytest.raises(ChiptuneError, match=r"'duty' expects a number, got true"):
        render_role(spec(synth, duty=True), notes, SR, host=host)
    with pytest.raises(ChiptuneError, match=r"'waveform' must be one of pulse, triangle, saw, got 'sine'"):
        render_role(spec(synth, waveform="sine"), notes, SR, host=host)


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def fake_bundle(root: Path, name: str, folder: str, binary: str, content: bytes) -> Path:
    bundle = root / f"{name}.vst3"
    (bundle / "Contents" / folder).mkdir(parents=True)
    (bundle / "Contents" / folder / binary).write_bytes(content)
    return bundle


@pytest.mark.parametrize(("make", "reason"), [
    (lambda d: d / "Nothing.vst3", "not found"),
    (lambda d: write(d / "synth.so", b"\x7fELF"), "not a VST3 plugin"),
    (lambda d: write(d / "Text.vst3", b"hello"), "not a VST3 plugin"),
    (lambda d: fake_bundle(d, "Win", "x86_64-win", "Win.vst3", b"MZ\x90\x00"), r"is a Windows \(x86_64\) build"),
    (lambda d: fake_bundle(d, "Mac", "MacOS", "Mac", b"\xcf\xfa\xed\xfe"), "is a macOS build"),
    (lambda d: fake_bundle(d, "Junk", "x86_64-linux", "Junk.so", b"junk"), "is not a Linux shared library"),
    (lambda d: (d / "Empty.vst3").mkdir() or d / "Empty.vst3", "no Contents folder"),
])
def test_unloadable_bundles_are_one_line_naming_preset_and_role(tmp_path: Path, make, reason: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ChiptuneError, match=rf"^song.toml: role drums: plugin [^:]*: .*{reason}") as info:
        plugin_spec(str(path), base_dir=tmp_path, origin="song.toml: role drums")
    assert "\n" not in str(info.value)


def test_plugin_paths_resolve_against_preset_home_env_and_search_path(
        synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "plugins" / "vendor"
    folder.mkdir(parents=True)
    shutil.copytree(synth, folder / "MySynth.vst3")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SYNTHS", str(tmp_path / "plugins"))
    assert plugin_spec("plugins/vendor/MySynth.vst3", base_dir=tmp_path).path == folder / "MySynth.vst3"
    assert plugin_spec("~/plugins/vendor/MySynth.vst3").path == folder / "MySynth.vst3"
    assert plugin_spec("$SYNTHS/vendor/MySynth.vst3").path == folder / "MySynth.vst3"
    with pytest.raises(ChiptuneError, match=r"MySynth: not found as a path nor on the VST3 search path"):
        plugin_spec("MySynth", base_dir=tmp_path / "presets", origin="song.toml: role lead")
    monkeypatch.setenv("CHIPTUNE_FORGE_VST3_PATH", str(tmp_path / "plugins"))
    assert plugin_spec("MySynth", base_dir=tmp_path / "presets").path == folder / "MySynth.vst3"
    assert plugin_spec("MySynth.vst3").path == folder / "MySynth.vst3"


def test_preset_and_state_files_are_checked_before_any_loading(synth: Path, tmp_path: Path) -> None:
    with pytest.raises(ChiptuneError, match=r"role lead.state_file: plugin .*: cannot read .*missing.bin"):
        plugin_spec(str(synth), base_dir=tmp_path, origin="song.toml: role lead", state_file="missing.bin")
    (tmp_path / "x.fxp").write_bytes(b"CcnK")
    with pytest.raises(ChiptuneError, match=r"lead.preset_file: plugin .*: 'x.fxp' is not a .vstpreset file"):
        plugin_spec(str(synth), base_dir=tmp_path, origin="song.toml: role lead", preset_file="x.fxp")
    for junk in (b"garbage\n", b"VC2!" + (99).to_bytes(4, "little") + b"short"):
        (tmp_path / "junk.bin").write_bytes(junk)
        with pytest.raises(ChiptuneError, match=r"role lead.state_file: plugin .*: .*junk.bin is not a plugin state "
                                                r"\(write one with 'chiptune-forge plugins state'\)$"):
            plugin_spec(str(synth), base_dir=tmp_path, origin="song.toml: role lead", state_file="junk.bin")


def test_preset_role_tables_are_checked_key_by_key(synth: Path, tmp_path: Path) -> None:
    origin = "song.toml: roles.lead"
    state = b"VC2!" + (5).to_bytes(4, "little") + b"state"
    (tmp_path / "lead.bin").write_bytes(state)
    good = plugins.preset_plugin({"plugin": str(synth), "parameters": {"duty": 0.3, "waveform": "saw"},
                                  "state_file": "lead.bin"}, origin, tmp_path)
    assert good.parameters == (("duty", 0.3), ("waveform", "saw")) and good.state == state
    assert good.origin == origin and good.path.is_absolute()
    for table, message in [
        ({"plugin": 3}, r"^song.toml: roles.lead.plugin: expected a .vst3 path or bundle name, got 3$"),
        ({"plugin": str(synth), "parameters": [1]}, r"^song.toml: roles.lead.parameters: expected a table"),
        ({"plugin": str(synth), "parameters": {"duty": [1]}}, r"^song.toml: roles.lead.parameters.duty: expected"),
        ({"plugin": str(synth), "state_file": 1}, r"^song.toml: roles.lead.state_file: expected a file path"),
        ({"plugin": str(synth), "state_file": "a.bin", "preset_file": "b.vstpreset"}, r"not both"),
    ]:
        with pytest.raises(ChiptuneError, match=message):
            plugins.preset_plugin(table, origin, tmp_path)


def test_fingerprint_follows_the_setup_and_the_installed_binary(synth: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "Copy.vst3"
    shutil.copytree(synth, bundle)
    first = plugin_spec(str(bundle), parameters={"duty": 0.3}).fingerprint()
    assert first == plugin_spec(str(bundle), parameters={"duty": 0.3}).fingerprint()
    assert first != plugin_spec(str(bundle), parameters={"duty": 0.4}).fingerprint()
    binary = next((bundle / "Contents").glob("*-linux/*.so"))
    os.utime(binary, ns=(0, 12345))  # a reinstalled plugin
    assert first != plugin_spec(str(bundle), parameters={"duty": 0.3}).fingerprint()


# ------------------------------------------------------------------------------------------- MIDI events


def test_role_messages_order_programs_drums_and_restrikes() -> None:
    notes = [Note(60, 100, 0.0, 1.0, program=33), Note(60, 90, 0.5, 0.8, program=33),
             Note(36, 127, 0.5, 0.6, is_drum=True), Note(64, 0, 1.0, 1.5, program=34)]
    msgs = role_messages(notes, controls=[(bytes([0xB0, 64, 127]), 1.0)])
    readable = [(round(t, 6), d.hex()) for d, t in msgs]
    assert readable == [
        (0.0, "c021"), (0.0, "903c64"),  # program 33 before the first note
        (0.5, "803c00"), (0.5, "903c5a"),  # the re-struck C4 ends before it starts again
        (0.5, "99247f"),  # drums on channel 10
        (0.6, "892400"), (0.8, "803c00"),
        (1.0, "c022"), (1.0, "b0407f"), (1.0, "904001"),  # program and pedal before the note; velocity >= 1
        (1.5, "804000"),
    ]
    # Controls at one instant keep their order: a restored value, then the one that replaces it; RPN select
    # (CC101, CC100) before its data entry (CC6).
    same_time = [bytes([0xB0, 1, 100]), bytes([0xB0, 1, 0]), bytes([0xB0, 101, 0]), bytes([0xB0, 100, 0]),
                 bytes([0xB0, 6, 12])]
    msgs = role_messages([], controls=[(d, 2.0) for d in same_time])
    assert [d for d, _ in msgs] == same_time


def test_role_messages_spread_more_than_pedalboards_limit_per_timestamp() -> None:
    msgs = role_messages([Note(p, 100, 0.0, 1.0) for p in range(120)])
    at_zero = [t for _, t in msgs if t < 0.5]
    assert len(at_zero) == 120 and max(at_zero) < 1e-6 and max(at_zero.count(t) for t in at_zero) <= 100


# -------------------------------------------------------------------------------------------------- CLI


@pytest.fixture()
def cli_host(host: PluginHost, monkeypatch: pytest.MonkeyPatch) -> PluginHost:
    monkeypatch.setattr(plugins, "_default_host", host)
    return host


def test_plugins_info_text_and_json(synth: Path, cli_host: PluginHost, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "info", str(synth)]) == 0
    text = capsys.readouterr().out
    assert "ForgeTestSynth (instrument)" in text and "latency: 96 samples" in text
    # DPF reports the latency through an output parameter too: listed, but marked as not for presets
    assert re.search(r"\n  latency_frames +float .*\(Latency; read-only or not automatable\)\n", text)
    assert "duty " in text and not re.search(r"duty .*automatable", text)
    assert "waveform" in text and "pulse | triangle | saw" in text
    assert main(["plugins", "info", str(synth), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    params = {p["name"]: p for p in info["parameters"]}
    assert info["kind"] == "instrument" and info["latency_samples"] == LATENCY
    assert params["duty"]["default"] == pytest.approx(0.5) and params["duty"]["minimum"] == pytest.approx(0.05)
    assert params["release_s"]["default"] == pytest.approx(0.2) and params["release_s"]["units"] == "s"
    assert params["waveform"]["choices"] == ["pulse", "triangle", "saw"] and params["waveform"]["default"] == "pulse"
    assert not any(name.startswith("midi_") for name in params)
    assert not params["latency_frames"]["automatable"] and params["duty"]["automatable"]


def test_plugins_state_writes_a_state_file_presets_can_use(synth: Path, cli_host: PluginHost, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lead.bin"
    assert main(["plugins", "state", str(synth), "--set", "waveform=saw", "--set", "duty=0.2", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    notes = [Note(62, 100, 0.0, 0.3)]
    restored = plugin_spec(str(synth), state_file=str(out))
    assert np.array_equal(render_role(restored, notes, SR, host=cli_host),
                          render_role(spec(synth, waveform="saw", duty=0.2), notes, SR, host=cli_host))


def test_plugins_errors_are_one_line_exit_1(synth: Path, cli_host: PluginHost, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "info", str(tmp_path / "Gone.vst3")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("chiptune-forge: error: ") and "Gone.vst3: not found" in err and "\n" not in err
    assert main(["plugins", "state", str(synth), "--set", "duty", "-o", str(tmp_path / "s.bin")]) == 1
    assert "--set expects name=value" in capsys.readouterr().err
    assert not (tmp_path / "s.bin").exists()


# ------------------------------------------------------------------------------ presets and render_piece


def write_preset(folder: Path, synth: Path, lead: str = "", extra: str = "", volume: float = 0.5,
                 parameters: str = 'waveform = "triangle", release_s = 0.6') -> Path:
    """A preset with a plugin lead and a built-in bass; `lead` and `extra` add lines to the lead and after."""
    path = folder / "mixed.toml"
    path.write_text(f"""
[arrange]
drums = false
[roles.lead]
plugin = "{synth}"
parameters = {{ {parameters} }}
volume = {volume}
{lead}
[roles.bass]
instrument = "builtin:bass"
volume = 0.4
{extra}
""")
    return path


@pytest.fixture()
def song(tmp_path: Path):
    from midi_factory import simple_song

    from chiptune_forge.midi import read_midi

    return read_midi(simple_song(tmp_path / "song.mid", bars=2))


def test_a_parameter_the_plugin_lacks_is_put_on_its_preset_line(synth: Path, cli_host: PluginHost,
                                                                 tmp_path: Path, song) -> None:
    """The plugin's parameters are only known once it loads, and the problem still names the preset line."""
    from chiptune_forge.presets import load_preset
    from chiptune_forge.render import render_piece

    inline = write_preset(tmp_path, synth, parameters="dutty = 0.3")  # parameters = { ... } is on line 6
    with pytest.raises(ChiptuneError, match=rf"^{re.escape(str(inline))}:6: roles.lead.parameters.dutty: plugin "
                                            r".*unknown parameter 'dutty' \(did you mean 'duty'\?"):
        render_piece(song, load_preset(inline), 32000)
    table = tmp_path / "table.toml"
    table.write_text(f'[roles.lead]\nplugin = "{synth}"\n\n[roles.lead.parameters]\nwaveform = "sine"\nduty = 0.5\n')
    with pytest.raises(ChiptuneError, match=rf"^{re.escape(str(table))}:5: roles.lead.parameters.waveform: plugin "
                                            r".*'waveform' must be one of pulse, triangle, saw, got 'sine'"):
        render_piece(song, load_preset(table), 32000)
    dotted = tmp_path / "dotted.toml"  # a dotted key the line scan does not follow: the role, no wrong line
    for name in ("dutty", "a"):  # "a" also appears in the [roles.lead] header above it
        dotted.write_text(f'[roles.lead]\nplugin = "{synth}"\nparameters.{name} = 0.3\n')
        with pytest.raises(ChiptuneError, match=rf"^{re.escape(str(dotted))}: roles.lead: plugin .*unknown parameter"):
            render_piece(song, load_preset(dotted), 32000)


def test_a_preset_mixing_builtin_and_plugin_roles_renders(synth: Path, cli_host: PluginHost, tmp_path: Path,
                                                         song) -> None:
    from chiptune_forge.presets import load_preset
    from chiptune_forge.render import render_piece

    mixed = render_piece(song, load_preset(write_preset(tmp_path, synth)), 32000)
    silent_lead = render_piece(song, load_preset(write_preset(tmp_path, synth, volume=0.0)), 32000)
    assert np.abs(silent_lead).max() > 0.01  # the built-in bass plays
    n = min(len(mixed), len(silent_lead))
    assert np.abs(mixed[:n] - silent_lead[:n]).max() > 0.05  # and so does the plugin lead
    short = render_piece(song, load_preset(write_preset(tmp_path, synth, parameters="release_s = 0.05")),
                         32000)
    assert len(mixed) > len(short) + 0.4 * 32000  # the plugin's 0.6 s release is rendered, not cut


def test_a_midi_files_pitch_bend_reaches_a_plugin_role(synth: Path, cli_host: PluginHost, tmp_path: Path) -> None:
    import mido
    from midi_factory import tempo, write_song

    from chiptune_forge.midi import read_midi
    from chiptune_forge.presets import load_preset
    from chiptune_forge.render import render_piece

    bend = mido.Message("pitchwheel", pitch=8191, channel=4)  # full up: +2 semitones
    path = write_song(tmp_path / "bend.mid", [[tempo(0, 60)], [
        (0, mido.Message("note_on", note=69, velocity=100, channel=4)), (240, bend),  # 0.5 s at 60 qpm
        (480, mido.Message("note_off", note=69, velocity=0, channel=4))]])
    preset = load_preset(write_preset(tmp_path, synth, parameters='waveform = "triangle", release_s = 0.005'))
    audio = render_piece(read_midi(path), preset, SR)
    before, after = peak_hz(audio[int(0.1 * SR):int(0.45 * SR), 0]), peak_hz(audio[int(0.55 * SR):int(0.95 * SR), 0])
    assert before == pytest.approx(440, rel=0.01)
    assert after == pytest.approx(440 * 2 ** (2 / 12), rel=0.01)


def test_role_effects_apply_to_the_plugin_stem(synth: Path, cli_host: PluginHost, tmp_path: Path, song) -> None:
    from chiptune_forge.presets import load_preset
    from chiptune_forge.render import render_piece

    muted = load_preset(write_preset(tmp_path, synth, "[[roles.lead.effects]]\ntype = \"Gain\"\ngain_db = -150"))
    assert muted.roles["lead"].effects[0].type == "Gain"
    silent_lead = load_preset(write_preset(tmp_path, synth, volume=0.0))
    assert np.array_equal(render_piece(song, muted, 32000), render_piece(song, silent_lead, 32000))


def test_preset_fingerprint_follows_plugin_settings(synth: Path, tmp_path: Path) -> None:
    from chiptune_forge.presets import load_preset

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_preset(write_preset(tmp_path / "a", synth))
    assert a.fingerprint() == load_preset(write_preset(tmp_path / "b", synth)).fingerprint()
    changed = load_preset(write_preset(tmp_path / "b", synth, parameters="duty = 0.3"))
    assert a.fingerprint() != changed.fingerprint()


@pytest.mark.parametrize(("lead", "extra", "message"), [
    ('instrument = "builtin:pulse50"', "", r"roles.lead.instrument: give instrument or plugin, not both"),
    ("", "[[roles.bass.effects]]\ntype = \"Gain\"", r"roles.bass.effects: only for a plugin role"),
    ("adsr = [15, 5, 6, 12]", "", r"roles.lead.adsr: unknown key"),
    ("max_tail = 100", "", r"roles.lead.max_tail: expected seconds from 0 to 60"),
])
def test_plugin_role_mistakes_are_one_line_naming_file_and_role(synth: Path, tmp_path: Path, lead: str,
                                                                extra: str, message: str) -> None:
    from chiptune_forge.presets import load_preset

    with pytest.raises(ChiptuneError, match=rf"mixed.toml:\d+: {message}") as info:
        load_preset(write_preset(tmp_path, synth, lead, extra))
    assert "\n" not in str(info.value)


def test_missing_plugin_in_a_preset_names_file_and_role(tmp_path: Path) -> None:
    from chiptune_forge.presets import load_preset

    with pytest.raises(ChiptuneError, match=r"mixed.toml: roles.lead: plugin .*Gone.vst3: not found"):
        load_preset(write_preset(tmp_path, tmp_path / "Gone.vst3"))


@pytest.mark.parametrize("rate", ["32000", "48000"])  # a WAV written as it is mixed, and a whole render
def test_render_with_a_crashing_plugin_exits_1_and_writes_nothing(synth: Path, cli_host: PluginHost,
                                                                  tmp_path: Path, rate: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from midi_factory import simple_song

    preset = write_preset(tmp_path, synth, parameters="crash = 1")
    out = tmp_path / "out.wav"
    song = simple_song(tmp_path / "s.mid", bars=2)
    assert main(["render", str(song), "-o", str(out), "--preset", str(preset), "--sample-rate", rate]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"chiptune-forge: error: {song}: ") and "\n" not in err
    assert "mixed.toml: roles.lead: plugin" in err and "ForgeTestSynth.vst3: crashed while rendering" in err
    assert not out.exists() and not list(tmp_path.glob("out*"))


def two_tracks(folder: Path, name: str, preset: str) -> None:
    """A project of two tracks from song.mid: "fine" on good.toml, and `name` on `preset`."""
    (folder / "chiptune.toml").write_text(f"""
[project]
output_dir = "music"
preset = "good.toml"
formats = ["wav"]
sample_rate = 32000

[[track]]
name = "fine"
midi = "song.mid"
bars = 2

[[track]]
name = "{name}"
midi = "song.mid"
bars = 2
preset = "{preset}"
""")


def test_a_crashing_plugin_fails_its_track_and_the_build_goes_on(synth: Path, tmp_path: Path) -> None:
    from midi_factory import simple_song

    from chiptune_forge.builder import build

    simple_song(tmp_path / "song.mid", bars=2)
    write_preset(tmp_path, synth).rename(tmp_path / "good.toml")
    write_preset(tmp_path, synth, parameters="crash = 1").rename(tmp_path / "bad.toml")
    two_tracks(tmp_path, "broken", "bad.toml")
    report = {t.name: t for t in build(tmp_path / "chiptune.toml").tracks}
    assert report["fine"].status == "built" and (tmp_path / "music" / "fine.wav").is_file()
    assert report["broken"].status == "failed" and not (tmp_path / "music" / "broken.wav").exists()
    assert "bad.toml: roles.lead: plugin" in report["broken"].error and "crashed" in report["broken"].error


def test_a_missing_plugin_fails_only_the_tracks_that_use_it(synth: Path, tmp_path: Path) -> None:
    from midi_factory import simple_song

    from chiptune_forge.builder import build

    simple_song(tmp_path / "song.mid", bars=2)
    write_preset(tmp_path, synth).rename(tmp_path / "good.toml")
    write_preset(tmp_path, tmp_path / "Gone.vst3").rename(tmp_path / "gone.toml")
    two_tracks(tmp_path, "lost", "gone.toml")
    report = {t.name: t for t in build(tmp_path / "chiptune.toml").tracks}
    assert report["fine"].status == "built" and (tmp_path / "music" / "fine.wav").is_file()
    assert report["lost"].status == "failed" and "Gone.vst3: not found" in report["lost"].error


def test_state_and_preset_file_problems_name_their_key_and_line(synth: Path, tmp_path: Path) -> None:
    from chiptune_forge.presets import load_preset

    (tmp_path / "junk.bin").write_bytes(b"garbage")
    for lead, key in (('state_file = "missing.bin"', "state_file"), ('state_file = "junk.bin"', "state_file"),
                      ('preset_file = "x.fxp"', "preset_file")):
        path = write_preset(tmp_path, synth, lead=lead)
        with pytest.raises(ChiptuneError) as info:
            load_preset(path)
        assert str(info.value).startswith(f"{path}:8: roles.lead.{key}: plugin "), str(info.value)


def test_a_program_entry_over_a_plugin_role_keeps_the_plugin(synth: Path, tmp_path: Path) -> None:
    from chiptune_forge.presets import load_preset

    path = write_preset(tmp_path, synth, extra="[programs.33]\nvolume = 0.25\n")
    preset = load_preset(path)
    lead = preset.spec_for("lead", 33)
    assert lead.plugin == preset.roles["lead"].plugin and lead.volume == 0.25
    assert preset.spec_for("bass", 33).instrument == "builtin:bass"


def test_convolution_with_its_file_and_mix_loads_and_a_bad_mix_is_named(tmp_path: Path) -> None:
    import soundfile as sf

    from chiptune_forge.presets import load_preset

    sf.write(str(tmp_path / "ir.wav"), np.r_[1.0, np.zeros(99)].astype(np.float32), 32000)
    good = tmp_path / "room.toml"
    good.write_text('[[effects]]\ntype = "Convolution"\nimpulse_response_filename = "ir.wav"\nmix = 0.5\n')
    assert load_preset(good).effects[0].type == "Convolution"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[effects]]\ntype = "Reverb"\nroom_size = 0.5\nwet_level = 7.0\n')
    with pytest.raises(ChiptuneError, match=r"bad\.toml:4: effects\[0\]\.wet_level: Reverb: "):
        load_preset(bad)


def test_a_plugin_stem_that_is_not_numbers_fails_the_render(synth: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from chiptune_forge import render
    from chiptune_forge.presets import load_preset

    monkeypatch.setattr("chiptune_forge.plugins.render_role",
                        lambda *a, **k: np.full((3200, 2), np.nan, dtype=np.float32))
    preset = load_preset(write_preset(tmp_path, synth))
    with pytest.raises(ChiptuneError, match=r"mixed\.toml: roles\.lead: plugin .*ForgeTestSynth\.vst3: the plugin "
                                            r"or its effects made samples that are not numbers"):
        render.render_piece(Piece([Note(60, 100, 0.0, 0.1)]), preset)


def test_a_program_entry_is_checked_even_when_every_role_plays_a_plugin_or_the_kit(synth: Path,
                                                                                   tmp_path: Path) -> None:
    from chiptune_forge.presets import load_preset

    roles = "".join(f'[roles.{role}]\nplugin = "{synth}"\n' for role in ("lead", "harmony", "bass"))
    for entry, message in (('state_file = "nope.bin"', "programs.5.state_file: only for a plugin role"),
                           ("adsr = [15, 7, 7, 0]\ngain = \"direct:100\"", "programs.5.gain: give either adsr or "
                                                                          "gain"),
                           ("release = 99", "programs.5.release: 99 is out of range")):
        path = tmp_path / "all_plugins.toml"
        path.write_text(f"{roles}[programs.5]\nvolume = 0.5\n{entry}\n")
        with pytest.raises(ChiptuneError, match=re.escape(message)):
            load_preset(path)


def test_an_effect_file_that_is_missing_is_named_on_its_line(tmp_path: Path) -> None:
    from chiptune_forge.presets import load_preset

    path = tmp_path / "room.toml"
    path.write_text('[[effects]]\ntype = "Convolution"\nmix = 0.5\nimpulse_response_filename = "gone.wav"\n')
    with pytest.raises(ChiptuneError, match=r"room\.toml:4: effects\[0\]\.impulse_response_filename: no such file: "):
        load_preset(path)


def test_an_unknown_flag_of_a_plugins_action_shows_that_actions_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["plugins", "info", "X.vst3", "--bogus"])
    assert "chiptune-forge plugins info: error: unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_plugin_stem_far_past_full_scale_clips_instead_of_wrapping(synth: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from chiptune_forge import render
    from chiptune_forge.presets import load_preset

    loud = np.full((3200, 2), 1e9, dtype=np.float32)
    loud[1600:] = -1e9
    monkeypatch.setattr("chiptune_forge.plugins.render_role", lambda *a, **k: loud)
    stats = render.RenderStats()
    audio = render.render_piece(Piece([Note(60, 100, 0.0, 0.1)]), load_preset(write_preset(tmp_path, synth)),
                                tail=False, stats=stats)
    assert audio[:1500].min() > 0 and audio[1700:3100].max() < 0, "a huge stem keeps its sign"
    assert stats.clipped > 0
