"""Magenta's hparams string form: what parses, what is refused, and how the CLI reports it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chiptune_forge.cli import main
from chiptune_forge.errors import ChiptuneError
from chiptune_forge.hparams import HParams, differences, parse_hparams


@pytest.mark.parametrize(("text", "expected", "given"), [
    ("batch_size=64,rnn_layer_sizes=[128,128,128]", HParams(batch_size=64, rnn_layer_sizes=(128, 128, 128)),
     {"batch_size", "rnn_layer_sizes"}),
    ('"batch_size=32, rnn_layer_sizes=[64, 64]"', HParams(batch_size=32, rnn_layer_sizes=(64, 64)),
     {"batch_size", "rnn_layer_sizes"}),
    ("dropout_keep_prob=1.0,clip_norm=3,learning_rate=0.01",
     HParams(dropout_keep_prob=1.0, clip_norm=3.0, learning_rate=0.01),
     {"dropout_keep_prob", "clip_norm", "learning_rate"}),
    ("", HParams(), set()),
    ("batch_size=8,", HParams(batch_size=8), {"batch_size"}),
])
def test_good_strings(text: str, expected: HParams, given: set[str]) -> None:
    hparams, names = parse_hparams(text)
    assert hparams == expected
    assert names == given


def test_round_trips_through_string_and_dict() -> None:
    hp = HParams(batch_size=8, rnn_layer_sizes=(32, 16), dropout_keep_prob=0.75, clip_norm=2.5, learning_rate=3e-4)
    assert parse_hparams(hp.to_string())[0] == hp
    assert HParams.from_dict(hp.to_dict()) == hp


WHOLE = "whole number above 0"
LIST = "list of whole numbers above 0"
UP_TO_1 = "above 0 up to 1"


@pytest.mark.parametrize(("text", "names"), [
    ("batch_sise=64", ["unknown hyperparameter 'batch_sise'", "did you mean 'batch_size'"]),
    ("rnn_layers=[128]", ["unknown hyperparameter 'rnn_layers'", "did you mean 'rnn_layer_sizes'"]),
    ("batch_size=many", ["bad value 'many' for batch_size", WHOLE]),
    ("batch_size=0", ["for batch_size", WHOLE]),
    ("rnn_layer_sizes=[128,0]", ["for rnn_layer_sizes", LIST]),
    ("rnn_layer_sizes=[]", ["for rnn_layer_sizes", LIST]),
    ("rnn_layer_sizes=256", ["bad value '256' for rnn_layer_sizes", LIST]),
    ("batch_size=8,,rnn_layer_sizes=[32]", ["an empty entry between commas"]),

    ("rnn_layer_sizes=[128,", ["for rnn_layer_sizes", LIST]),
    ("dropout_keep_prob=1.5", ["dropout_keep_prob=1.5 is out of range", UP_TO_1]),
    ("dropout_keep_prob=0", ["dropout_keep_prob=0 is out of range", UP_TO_1]),
    ("learning_rate=-1", ["learning_rate=-1 is out of range", UP_TO_1]),
    ("clip_norm=inf", ["clip_norm=inf is out of range", "finite number above 0"]),
    ("batch_size", ["'batch_size' is not name=value"]),
    ("rnn_layer_sizes=[8],rnn_layer_sizes=[16]", ["rnn_layer_sizes is given twice"]),
])
def test_bad_strings_name_the_problem(text: str, names: list[str]) -> None:
    with pytest.raises(ChiptuneError) as info:
        parse_hparams(text)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_differences_lists_only_given_names_that_differ() -> None:
    run = HParams(batch_size=64, rnn_layer_sizes=(128, 128), clip_norm=3.0)  # clip_norm not given: not listed
    given, names = parse_hparams("batch_size=64,rnn_layer_sizes=[64],learning_rate=0.001")
    assert given.clip_norm != run.clip_norm
    out = differences(run, given, names)
    assert len(out) == 1 and out[0].startswith("rnn_layer_sizes")


def test_train_rejects_a_bad_hparams_string_in_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--run-dir", str(tmp_path / "run"), "--dataset", str(tmp_path),
                 "--hparams", "rnn_layer_size=[128]"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and "rnn_layer_size" in err and "rnn_layer_sizes" in err


def test_bad_hparams_fail_before_tensorflow_is_imported(tmp_path) -> None:
    code = ("import sys; from chiptune_forge.cli import main; "
            f"rc = main(['train', '--run-dir', {str(tmp_path)!r}, '--dataset', {str(tmp_path)!r}, "
            "'--hparams', 'batch_size=x']); print(rc, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "False"]
