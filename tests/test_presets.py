"""Presets: shipped files load, fingerprints are stable, and every mistake is one line naming file and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chiptune_forge.cli import main
from chiptune_forge.errors import ChiptuneError
from chiptune_forge.presets import (
    DEFAULT_PRESET,
    ROLES,
    list_presets,
    load_preset,
    make_effect,
    parse_preset,
    shipped_names,
    shipped_presets_dir,
)
from chiptune_forge.snes.instruments import INSTRUMENTS

SHIPPED = {"snes", "snes_overworld", "snes_dungeon", "snes_battle", "snes_dry"}


def test_every_shipped_preset_loads_with_all_roles() -> None:
    assert set(shipped_names()) >= SHIPPED
    assert DEFAULT_PRESET == "snes"
    for name in shipped_names():
        preset = load_preset(name)
        assert preset.name == name and preset.path is not None and preset.path.parent == shipped_presets_dir()
        assert set(preset.roles) == set(ROLES)
        assert preset.description
    assert load_preset("snes_dry").echo is None
    dungeon = load_preset("snes_dungeon")
    assert dungeon.echo is not None and dungeon.echo.delay == 224 * 32 and dungeon.effects


def test_list_presets_gives_one_description_per_preset() -> None:
    listed = dict(list_presets())
    assert set(listed) >= SHIPPED and all(listed.values())


def test_presets_command_lists_presets_and_instruments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in SHIPPED | {"builtin:pulse50", "builtin:kit", "builtin:bell"}:
        assert f"  {name} " in out
    assert f"presets (in {shipped_presets_dir()}; copy one" in out, "where to find a preset to copy"


def test_fingerprint_is_stable_and_follows_content(tmp_path: Path) -> None:
    snes = load_preset("snes")
    assert snes.fingerprint() == load_preset("snes").fingerprint()
    assert len({load_preset(n).fingerprint() for n in SHIPPED}) == len(SHIPPED)
    copy = tmp_path / "mine.toml"
    copy.write_bytes((shipped_presets_dir() / "snes.toml").read_bytes())
    assert load_preset(copy).fingerprint() == snes.fingerprint()  # name and place do not matter
    copy.write_text(copy.read_text().replace("volume = 0.2\n", "volume = 0.21\n", 1))
    assert load_preset(copy).fingerprint() != snes.fingerprint()


def test_a_relative_path_is_taken_from_base_dir(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "quiet.toml").write_text('description = "q"\n[master]\nvolume = 0.5\n')
    preset = load_preset("sub/quiet.toml", base_dir=tmp_path)
    assert preset.name == "quiet" and preset.master_volume == (64, 64)
    # roles left out take the engine defaults, instruments take their own envelopes
    assert preset.roles["bass"].instrument == "builtin:bass" and preset.roles["lead"].envelope is not None


def test_a_program_table_maps_tracks_of_that_program(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[programs.33]\ninstrument = "builtin:bass"\nvolume = 0.4\n')
    preset = load_preset(path)
    assert preset.spec_for("harmony", 33).instrument == "builtin:bass"
    assert preset.spec_for("harmony", 5) is preset.roles["harmony"]


def test_a_program_entry_changes_only_what_it_sets_of_the_role_it_plays() -> None:
    shipped = load_preset("snes")
    text = (shipped_presets_dir() / "snes.toml").read_text() + '\n[programs.33]\ninstrument = "builtin:bass"\n'
    mapped = parse_preset(text.encode(), "mapped", None)
    assert mapped.spec_for("bass", 33) == shipped.roles["bass"], "the bass role already plays builtin:bass"
    lead = mapped.spec_for("lead", 33)
    assert (lead.instrument, lead.volume, lead.pan, lead.echo) == ("builtin:bass", 0.2, 0.1, True)
    assert lead.envelope == INSTRUMENTS["bass"].envelope, "another instrument brings its own envelope"
    text += "volume = 0.5\nadsr = [15, 7, 7, 0]\n"
    bass = parse_preset(text.encode(), "mapped", None).spec_for("bass", 33)
    env = bass.envelope
    assert bass.volume == 0.5 and bass.echo is False
    assert (env.attack, env.decay, env.sustain_level, env.sustain_rate) == (15, 7, 7, 0)


def error_for(tmp_path: Path, text: str) -> str:
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ChiptuneError) as info:
        load_preset(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize(("text", "expected"), [
    ("[ecco]\ndelay_ms = 64\n", ["ecco: unknown key", "did you mean 'echo'"]),
    ("[roles.lead]\nvolum = 0.5\n", ["roles.lead.volum: unknown key", "did you mean 'volume'"]),
    ("[roles.leed]\nvolume = 0.5\n", ["roles.leed: unknown key", "did you mean 'lead'"]),
    ("[roles.lead]\nvolume = 1.5\n", ["roles.lead.volume: 1.5 is out of range"]),
    ("[roles.lead]\npan = \"left\"\n", ["roles.lead.pan: expected a number"]),
    ('[roles.lead]\ninstrument = "builtin:pulse5"\n', ["unknown instrument 'builtin:pulse5'",
                                                      "did you mean 'builtin:pulse50'"]),
    ('[roles.bass]\ninstrument = "bass"\n', ["roles.bass.instrument", "did you mean 'builtin:bass'"]),
    ("[roles.lead]\nadsr = [15, 9, 6, 12]\n", ["roles.lead.adsr: 9 is out of range 0..7"]),
    ('[roles.lead]\nadsr = [15, 5, 6, 12]\ngain = "direct:90"\n', ["roles.lead.gain: give either adsr or gain"]),
    ('[roles.lead]\ngain = "decrease:9"\n', ["roles.lead.gain: unknown GAIN mode 'decrease'", "silent"]),
    ('[roles.drums]\nadsr = [15, 5, 6, 12]\n', ["roles.drums.adsr: the drum kit sets its own envelope"]),
    ("[echo]\ndelay_ms = 50\n", ["echo.delay_ms: 50 is not a multiple of 16", "did you mean 48"]),
    ("[echo]\ndelay_ms = 300\n", ["echo.delay_ms: 300 is out of range 16..240"]),
    ("[echo]\ndelay_ms = 64\nfir = [1, 2, 3]\n", ["echo.fir: expected a list of 8 integers"]),
    ("[programs.200]\ninstrument = \"builtin:bass\"\n", ["programs.200: a MIDI program number"]),
    ("[master\nvolume = 1\n", ["broken.toml:1:8: TOML syntax error: Expected ']'"]),
    ("\ufeff[master]\nvolum = 1\n", ["broken.toml:2: master.volum: unknown key (did you mean 'volume'?)"]),
    ("[[effects]]\ntype = \"Reverbb\"\n", ["effects[0].type: unknown effect 'Reverbb'", "did you mean 'Reverb'"]),
    ("[[effects]]\ntype = \"Reverb\"\nroom_sise = 0.3\n", ["effects[0].room_sise: unknown parameter for Reverb",
                                                          "did you mean 'room_size'"]),
    ("[[effects]]\ntype = \"Reverb\"\nroom_size = 3.0\n", ["broken.toml:3: effects[0].room_size: Reverb: Room Size",
                                                         "between 0.0 and 1.0"]),
    ("[[effects]]\ntype = \"Resample\"\nquality = \"ZeroOrderHol\"\n",
     ["broken.toml:3: effects[0].quality: unknown choice 'ZeroOrderHol' (did you mean 'ZeroOrderHold'?); expected "
      "one of ZeroOrderHold, Linear"]),
    ("[[effects]]\ntype = \"LadderFilter\"\nmode = 2\n", ["effects[0].mode: unknown choice 2; expected one of LPF12"]),
    ("[[effects]]\ntyp = \"Reverb\"\n", ["broken.toml:2: effects[0].typ: unknown key (did you mean 'type'?)"]),
    ("[[effects]]\ntype = \"Reverb\"\nroom_size = \"big\"\n", ["effects[0].room_size: expected a finite number, "
                                                               "got 'big'"]),
    ("[[effects]]\ntype = \"Gain\"\ngain_db = nan\n", ["effects[0].gain_db: expected a finite number, got nan"]),
    ("[[effects]]\ngain_db = 3\n", ["effects[0].type: missing: the pedalboard effect to use"]),
])
def test_broken_presets_name_the_file_and_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    message = error_for(tmp_path, text)
    for part in expected:
        assert part in message


def test_unknown_names_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ChiptuneError, match="did you mean 'snes_overworld'"):
        load_preset("snes_overwrld")
    with pytest.raises(ChiptuneError, match="preset file not found"):
        load_preset("nothing/here.toml", base_dir=tmp_path)
    with pytest.raises(ChiptuneError, match="did you mean 'snes'"):
        load_preset("SNES")
    with pytest.raises(ChiptuneError, match=r"not found \(the shipped preset is named snes_dungeon, without .toml\)"):
        load_preset("snes_dungeon.toml", base_dir=tmp_path)


def test_effect_enums_are_given_by_name(tmp_path: Path) -> None:
    path = tmp_path / "crunch.toml"
    path.write_text('[[effects]]\ntype = "Resample"\ntarget_sample_rate = 16000.0\nquality = "ZeroOrderHold"\n')
    spec = load_preset(path).effects[0]
    assert spec.params == (("target_sample_rate", 16000.0), ("quality", "ZeroOrderHold"))
    import pedalboard

    assert make_effect(spec).quality == pedalboard.Resample.Quality.ZeroOrderHold


@pytest.mark.parametrize(("text", "line", "key"), [
    ('description = "x"\n\n[roles.lead]\ninstrument = "builtin:pulse50"\nvolume = 7\n', 5, "roles.lead.volume"),
    ("[roles.leed]\nvolume = 0.5\n", 1, "roles.leed"),
    ("[echo]\nvolume = 0.2\n\ndelay_ms = 70\n", 4, "echo.delay_ms"),
    ('[[effects]]\ntype = "Reverb"\n\n[[effects]]\ntype = "Reverbb"\n', 5, "effects[1].type"),
    ('[[effects]]\ntype = "Reverb"\n\n[[effects]]\ngain_db = 3\n', 4, "effects[1].type"),
    ('[roles.lead]\nvolume = 0.5\n\n[[roles.lead.effects]]\ntype = "Gain"\n', 4, "roles.lead.effects"),
])
def test_a_preset_problem_names_its_line(tmp_path: Path, text: str, line: int, key: str) -> None:
    message = error_for(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'broken.toml'}:{line}: {key}: "), message


def test_a_program_entry_sets_only_the_mix_of_a_role_without_an_envelope() -> None:
    shipped = load_preset("snes")
    text = (shipped_presets_dir() / "snes.toml").read_text() + "\n[programs.33]\nadsr = [15, 7, 7, 0]\nvolume = 0.5\n"
    mapped = parse_preset(text.encode(), "mapped", None)
    drums = mapped.spec_for("drums", 33)
    assert drums == dataclasses.replace(shipped.roles["drums"], volume=0.5), "the kit keeps its own envelopes"
    env = mapped.spec_for("lead", 33).envelope
    assert (env.attack, env.decay, env.sustain_level, env.sustain_rate) == (15, 7, 7, 0)
