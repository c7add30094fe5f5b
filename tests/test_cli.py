"""CLI conventions shared by every subcommand: Magenta-style booleans, aliases, clean errors, fast start."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from chiptune_forge.cli import add_flag, build_parser, main, option, parse_args, parse_int_range


def flag_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flag(p, "condition-on-primer", True, "x")
    add_flag(p, "recursive", False, "y")
    p.add_argument(*option("eval-ratio"), dest="eval_ratio", type=float, default=0.1)
    return p


@pytest.mark.parametrize(("argv", "condition", "recursive"), [
    ([], True, False),
    (["--recursive"], True, True),
    (["--recursive=true", "--condition_on_primer=false"], False, True),
    (["--no-condition-on-primer", "--recursive=0"], False, False),
    (["--no_condition_on_primer", "--norecursive"], False, False),
    (["--condition-on-primer=yes"], True, False),
])
def test_boolean_spellings(argv: list[str], condition: bool, recursive: bool) -> None:
    args = parse_args(flag_parser(), argv)
    assert (args.condition_on_primer, args.recursive) == (condition, recursive)


def test_a_flag_never_takes_the_next_word_as_its_value() -> None:
    p = flag_parser()
    p.add_argument("folder")
    args = parse_args(p, ["--recursive", "songs"])
    assert (args.recursive, args.folder) == (True, "songs")


def test_bad_boolean_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(flag_parser(), ["--recursive=maybe"])
    assert info.value.code == 2
    assert "expected true or false" in capsys.readouterr().err


def test_underscore_aliases() -> None:
    assert flag_parser().parse_args(["--eval_ratio=0.25"]).eval_ratio == 0.25
    assert flag_parser().parse_args(["--eval-ratio", "0.5"]).eval_ratio == 0.5


def test_int_range() -> None:
    assert parse_int_range("-4,4") == (-4, 4)
    assert parse_int_range("3") == (-3, 3)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_int_range("a,b")


def test_every_listed_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """The command list is the documented set (each command has tests of its own), and each answers --help."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"dataset", "build", "init", "watch", "train", "evaluate", "export", "generate",
                                "plugins", "render", "presets"}
    for name in sub.choices:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: chiptune-forge {name}"), name


def test_help_starts_without_tensorflow() -> None:
    code = ("import sys; from chiptune_forge.cli import build_parser; build_parser().format_help(); "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "chiptune_forge", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "chiptune-forge" in out.stdout


def test_an_unknown_flag_is_reported_with_its_commands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--summary-frequncy", "5", "--run-dir", "r", "--dataset", "d"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("usage: chiptune-forge train ") and \
        err.endswith("chiptune-forge train: error: unrecognized arguments: --summary-frequncy 5\n")
