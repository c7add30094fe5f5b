"""The numpy generation engine: determinism, masking, primers, beam search, scores, files and CLI errors.

Models here are tiny and random (no TensorFlow); the Keras parity check is in test_generate_parity.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from midi_factory import notes_track, tempo, with_velocity_over_127, write_song

from chiptune_forge import lstm
from chiptune_forge.cli import main
from chiptune_forge.encoding import CONTINUED_NOTE, NEW_NOTE, START, STEP_END, decode, encode
from chiptune_forge.errors import ChiptuneError
from chiptune_forge.generate import (
    GenerationRequest,
    generate,
    melody_primer,
    output_seed,
    rank,
    write_outputs,
)
from chiptune_forge.lstm import LstmModel, load_model
from chiptune_forge.midi import QuantizedPiece
from chiptune_forge.scores import (
    empty_bar_fraction,
    mean_polyphony,
    notes_per_bar,
    pitch_range,
    scale_consistency,
    sparseness,
)


def random_arrays(layers: tuple[int, ...], seed: int, step_end_bias: float) -> dict[str, np.ndarray]:
    """Weights in the export format; a positive STEP_END bias keeps steps from filling up with notes."""
    rng = np.random.default_rng(seed)
    arrays = {"embedding": rng.normal(0, 1, (259, layers[0])).astype(np.float32)}
    width = layers[0]
    for i, units in enumerate(layers):
        arrays[f"lstm{i}_kernel"] = rng.normal(0, 1 / np.sqrt(width), (width, 4 * units)).astype(np.float32)
        arrays[f"lstm{i}_recurrent"] = rng.normal(0, 1 / np.sqrt(units), (units, 4 * units)).astype(np.float32)
        arrays[f"lstm{i}_bias"] = rng.normal(0, 0.1, 4 * units).astype(np.float32)
        width = units
    arrays["dense_kernel"] = rng.normal(0, 1, (width, 259)).astype(np.float32)
    bias = rng.normal(0, 0.5, 259).astype(np.float32)
    bias[STEP_END] += step_end_bias
    arrays["dense_bias"] = bias
    return arrays


def write_model(folder: Path, layers: tuple[int, ...] = (24, 24), seed: int = 0, step_end_bias: float = 3.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "weights.npz", **random_arrays(layers, seed, step_end_bias))
    info = {"format": "chiptune-forge-lstm-1", "encoding": "polyphony-1", "num_classes": 259,
            "hparams": {"batch_size": 64, "rnn_layer_sizes": list(layers), "dropout_keep_prob": 0.5,
                        "clip_norm": 5.0, "learning_rate": 0.001},
            "layers": list(layers), "embedding_dim": layers[0], "training_steps": 0}
    (folder / "model.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def model(model_dir: Path) -> LstmModel:
    return load_model(model_dir)


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory: pytest.TempPathFactory) -> LstmModel:
    """A model that rarely ends a step on its own: the polyphony cap has to do it."""
    return load_model(write_model(tmp_path_factory.mktemp("dense"), seed=1, step_end_bias=-4.0))


def steps_of(events: np.ndarray) -> list[list[int]]:
    out, current = [], []
    for ev in events[1:].tolist():
        if ev == STEP_END:
            out.append(current)
            current = []
        else:
            current.append(ev)
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("layers", [(128, 128), (256, 256)])  # 4-row and 16-row products
def test_rows_of_a_batch_do_not_depend_on_each_other(tmp_path: Path, layers: tuple[int, int]) -> None:
    """Bit for bit: BLAS alone gives rows different last bits at these widths depending on the batch size."""
    model = load_model(write_model(tmp_path, layers=layers))
    rng = np.random.default_rng(3)
    rows = 40
    state = model.initial_state(rows)
    for _ in range(3):
        _, state = model.step(rng.integers(0, 259, size=rows), state)
    events = rng.integers(0, 259, size=rows)
    batch, _ = model.step(events, state)
    for n in (1, 5, 9, 23):
        for start in (0, 3, rows - n):
            part, _ = model.step(events[start:start + n], state.take(np.arange(start, start + n)))
            assert np.array_equal(part, batch[start:start + n]), (n, start)


def test_same_seed_gives_byte_identical_files(model: LstmModel, tmp_path: Path) -> None:
    request = GenerationRequest(num_outputs=3, num_steps=48, primer_melody=[60, -2, 64], seed=7)
    write_outputs(generate(model, request), tmp_path / "a", request, model)
    write_outputs(generate(model, request), tmp_path / "b", request, model)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["generate.json", "output_01.mid", "output_02.mid", "output_03.mid"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_rerun_in_the_same_folder_leaves_no_outputs_of_the_earlier_run(model: LstmModel, tmp_path: Path) -> None:
    many = GenerationRequest(num_outputs=12, num_steps=16)
    write_outputs(generate(model, many), tmp_path, many, model)
    (tmp_path / "mine.mid").write_bytes(b"not generated")
    few = GenerationRequest(num_outputs=3, num_steps=16)
    write_outputs(generate(model, few), tmp_path, few, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "generate.json", "mine.mid", "output_01.mid", "output_02.mid", "output_03.mid"]


def test_an_output_does_not_depend_on_the_batch(model: LstmModel) -> None:
    request = GenerationRequest(num_outputs=8, num_steps=64, seed=11)
    eight = generate(model, request)
    one = generate(model, replace(request, num_outputs=1))
    assert np.array_equal(one[0].events, eight[0].events)
    assert [p.seed for p in eight] == [output_seed(11, i) for i in range(8)]
    assert len({bytes(p.events) for p in eight}) == 8
    neighbour = generate(model, replace(request, seed=12))
    assert not {bytes(p.events) for p in eight} & {bytes(p.events) for p in neighbour}, \
        "neighbouring seeds share no outputs"


def test_a_wide_model_gives_an_output_the_same_numbers_alone_or_among_many(tmp_path: Path) -> None:
    """Weights over 1 MB use 16-row products for batches of more than 8 rows, 4-row ones below."""
    model = load_model(write_model(tmp_path, layers=(256, 256)))
    events = np.random.default_rng(5).integers(0, 259, size=(6, 20))
    logits = {}
    for rows in (1, 3, 20):
        state = model.initial_state(rows)
        for t in range(events.shape[1]):
            out, state = model.step(np.resize(events[:, t], rows) if rows > 1 else events[:1, t], state)
        logits[rows] = out
    assert np.array_equal(logits[1][0], logits[20][0]) and np.array_equal(logits[3], logits[20][:3])


# ----------------------------------------------------------------------------------------- well-formed


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.5])
def test_streams_are_canonical_and_bounded(dense_model: LstmModel, temperature: float) -> None:
    request = GenerationRequest(num_outputs=4, num_steps=40, temperature=temperature, max_polyphony=3, seed=2)
    for piece in generate(dense_model, request):
        ev = piece.events
        assert ev[0] == START and ev[-1] == STEP_END and np.sum(ev == STEP_END) == 40
        assert np.array_equal(encode(decode(ev), start=True, end=False), ev)
        assert max(len(step) for step in steps_of(ev)) <= 3
        assert piece.quantized.num_steps == 40
        assert 0.0 < piece.scores["mask_removed_mass"] < 1.0


def test_dense_model_is_capped_at_the_snes_voice_count(dense_model: LstmModel) -> None:
    pieces = generate(dense_model, GenerationRequest(num_outputs=2, bars=2, seed=4))
    counts = [len(step) for p in pieces for step in steps_of(p.events)]
    assert max(counts) == 8
    assert all(len(p.events) <= 1 + 32 * 9 for p in pieces)


def test_length_in_bars_ends_on_a_bar_line(model: LstmModel) -> None:
    piece = generate(model, GenerationRequest(bars=3, primer_pitches=[60, 64, 67]))[0]
    assert piece.quantized.num_steps == 48
    assert piece.scores and piece.to_piece().tempos[0].qpm == 120.0


# ------------------------------------------------------------------------------------- sampling modes


def greedy_reference(model: LstmModel, total_steps: int, max_polyphony: int) -> list[int]:
    """Masked argmax decoding written out plainly, one event at a time."""
    logits, state = model.step(np.array([START]), model.initial_state(1))
    events, sounding, emitted, floor, steps = [START], set(), set(), 128, 0
    while steps < total_steps:
        allowed = [STEP_END]
        if len(emitted) < max_polyphony:
            allowed += [NEW_NOTE + p for p in range(floor)]
            allowed += [CONTINUED_NOTE + p for p in range(floor) if p in sounding]
        event = max(sorted(allowed), key=lambda e: logits[0, e])
        if event == STEP_END:
            sounding, emitted, floor, steps = emitted, set(), 128, steps + 1
        else:
            floor = (event - NEW_NOTE) % 128
            emitted.add(floor)
        events.append(event)
        logits, state = model.step(np.array([event]), state)
    return events


@pytest.mark.parametrize("temperature", [0.0, 1e-9, 1e-300])
def test_temperature_near_zero_follows_the_argmax(dense_model: LstmModel, temperature: float) -> None:
    pieces = generate(dense_model, GenerationRequest(num_outputs=2, num_steps=24, temperature=temperature,
                                                     max_polyphony=4, seed=5))
    expected = greedy_reference(dense_model, 24, 4)
    assert [p.events.tolist() for p in pieces] == [expected, expected]


def test_beam_of_one_is_plain_sampling(model: LstmModel) -> None:
    plain = GenerationRequest(num_outputs=3, num_steps=32, seed=9)
    beam = replace(plain, beam_size=1, branch_factor=1, steps_per_iteration=5)
    assert [p.events.tolist() for p in generate(model, plain)] == [p.events.tolist() for p in generate(model, beam)]


def test_greedy_beam_search_finds_the_greedy_path(dense_model: LstmModel) -> None:
    greedy = GenerationRequest(num_outputs=2, num_steps=20, temperature=0.0, max_polyphony=4)
    beam = replace(greedy, beam_size=3, branch_factor=2, steps_per_iteration=4)
    assert [p.events.tolist() for p in generate(dense_model, beam)] == \
        [p.events.tolist() for p in generate(dense_model, greedy)]


def test_beam_search_is_deterministic_and_per_output(model: LstmModel) -> None:
    request = GenerationRequest(num_outputs=3, num_steps=32, beam_size=3, branch_factor=2, steps_per_iteration=3,
                                seed=21)
    three = generate(model, request)
    assert [p.events.tolist() for p in three] == [p.events.tolist() for p in generate(model, request)]
    two = generate(model, replace(request, num_outputs=2))
    assert [p.events.tolist() for p in two] == [p.events.tolist() for p in three[:2]]
    for piece in three:
        assert np.array_equal(encode(decode(piece.events), start=True, end=False), piece.events)
        assert piece.quantized.num_steps == 32


# ---------------------------------------------------------------------------------------------- primers


def notes_of(q: QuantizedPiece) -> list[tuple[int, int, int]]:
    return sorted(zip(q.pitch.tolist(), q.start.tolist(), q.end.tolist(), strict=True))


def test_conditioning_starts_every_output_with_the_primer(model: LstmModel) -> None:
    melody = [60, -2, -2, -2, 64, -2, -1, 67]
    primer = melody_primer(melody)
    pieces = generate(model, GenerationRequest(num_outputs=3, num_steps=32, primer_melody=melody, seed=1))
    prefix = encode(primer, start=True, end=False)
    for piece in pieces:
        assert np.array_equal(piece.events[:len(prefix)], prefix)
        assert notes_of(piece.quantized.window(0, 8)) == notes_of(primer.window(0, 8))


def test_injected_primer_notes_appear_at_their_steps(model: LstmModel) -> None:
    melody = [72, -2, -2, 74, -2, -1, 71, -2, -2, -2, 72, -2, -2, -2, -2, -2]
    primer = melody_primer(melody)
    request = GenerationRequest(num_outputs=4, num_steps=32, primer_melody=melody, condition_on_primer=False,
                                inject_primer_during_generation=True, seed=3)
    for piece in generate(model, request):
        steps = steps_of(piece.events)
        for pitch, start, end in notes_of(primer):
            assert NEW_NOTE + pitch in steps[start]
            for s in range(start + 1, end):
                assert CONTINUED_NOTE + pitch in steps[s]
        assert np.array_equal(encode(decode(piece.events), start=True, end=False), piece.events)


def test_injected_notes_count_against_the_polyphony_cap(dense_model: LstmModel) -> None:
    request = GenerationRequest(num_outputs=3, num_steps=12, primer_pitches=[60, 64, 67], max_polyphony=4,
                                condition_on_primer=False, inject_primer_during_generation=True, seed=8)
    for piece in generate(dense_model, request):
        steps = steps_of(piece.events)
        assert all({NEW_NOTE + 60, NEW_NOTE + 64, NEW_NOTE + 67} <= set(s) for s in steps[:1])
        assert max(len(s) for s in steps) == 4


def test_a_midi_primer_with_data_bytes_over_127_is_used_with_a_warning(model: LstmModel, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = with_velocity_over_127(write_song(tmp_path / "primer.mid", [[tempo(0, 90)], notes_track([(48, 0, 8)])]))
    request = GenerationRequest(num_outputs=1, num_steps=16, primer_midi=path, condition_on_primer=False,
                                inject_primer_during_generation=True)
    [piece] = generate(model, request)
    assert NEW_NOTE + 48 in steps_of(piece.events)[0]
    assert capsys.readouterr().err == f"warning: {path}: data bytes above 127 (not valid MIDI) were read as 127\n"


def test_injected_chord_from_a_midi_primer(model: LstmModel, tmp_path: Path) -> None:
    path = write_song(tmp_path / "primer.mid", [[tempo(0, 90)], notes_track([(48, 0, 8), (55, 0, 8), (64, 4, 8)])])
    request = GenerationRequest(num_outputs=2, num_steps=16, primer_midi=path, condition_on_primer=False,
                                inject_primer_during_generation=True, qpm=None)
    for piece in generate(model, request):
        steps = steps_of(piece.events)
        assert {NEW_NOTE + 48, NEW_NOTE + 55} <= set(steps[0])
        assert {CONTINUED_NOTE + 48, CONTINUED_NOTE + 55, NEW_NOTE + 64} <= set(steps[4])
        assert piece.quantized.qpm == pytest.approx(90.0)


# ----------------------------------------------------------------------------------------------- scores


def test_likelihoods_match_a_direct_run_of_the_model(model: LstmModel) -> None:
    piece = generate(model, GenerationRequest(num_steps=20, primer_melody=[62, -2, 65], seed=6))[0]
    ev = piece.events.astype(np.int64)
    logits, _ = model.run(ev[:-1])
    expected = log_softmax(logits)[np.arange(len(ev) - 1), ev[1:]].mean()
    assert piece.scores["log_likelihood"] == pytest.approx(expected, abs=1e-6)
    bar = ev[1:np.flatnonzero(ev == STEP_END)[15] + 1]
    looped = np.concatenate([ev, bar])
    logits, _ = model.run(looped[:-1])
    expected = log_softmax(logits)[np.arange(len(ev) - 1, len(looped) - 1), bar].mean()
    assert piece.scores["loop_score"] == pytest.approx(expected, abs=1e-6)


def test_ranking_uses_the_documented_combination(model: LstmModel) -> None:
    pieces = generate(model, GenerationRequest(num_outputs=5, num_steps=32))
    for p in pieces:  # the README's formula
        s = p.scores
        assert s["rank_score"] == pytest.approx(
            s["log_likelihood"] + s["loop_score"] + s["scale_consistency"] - s["empty_bar_fraction"] - s["sparseness"])
    ranked = [p.scores["rank_score"] for p in rank(pieces)]
    assert ranked == sorted(ranked, reverse=True)


def test_musical_statistics() -> None:
    scale = [(60 + d, 2 * i, 2 * i + 2, 100) for i, d in enumerate((0, 2, 4, 5, 7, 9, 11, 12))]
    chord = [(48, 16, 20, 100), (52, 16, 20, 100), (55, 16, 20, 100), (61, 40, 41, 100)]
    q = QuantizedPiece.from_notes(scale + chord, num_steps=64)
    assert pitch_range(q) == 24
    assert notes_per_bar(q) == 12 / 4
    assert scale_consistency(q) == pytest.approx(11 / 12)
    assert empty_bar_fraction(q) == 0.25
    assert mean_polyphony(q) == pytest.approx((16 + 12 + 1) / (16 + 4 + 1))
    assert sparseness(q) == pytest.approx(np.log2(8 / 3))  # 3 notes a bar: 1.4 halvings below 8
    dense = QuantizedPiece.from_notes([(60 + i % 12, i, i + 1, 100) for i in range(64)], num_steps=64)
    assert sparseness(dense) == 0.0  # 16 notes a bar
    empty = QuantizedPiece.from_notes([], num_steps=32)
    assert sparseness(empty) == pytest.approx(np.log2(8 * 2))  # one note in two bars
    assert (pitch_range(empty), scale_consistency(empty), empty_bar_fraction(empty)) == (0.0, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------- models


def test_fingerprint_follows_the_weights(tmp_path: Path) -> None:
    a = load_model(write_model(tmp_path / "a"))
    b = load_model(write_model(tmp_path / "b"))
    c = load_model(write_model(tmp_path / "c", seed=5))
    assert a.model_fingerprint() == b.model_fingerprint() != c.model_fingerprint()


def test_model_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    write_model(run / "export")
    assert load_model(run).path == run / "export"
    monkeypatch.setattr(lstm, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    with pytest.raises(ChiptuneError, match="default model is not installed"):
        load_model("default")
    monkeypatch.setattr(lstm, "DEFAULT_MODEL_DIR", run / "export")
    assert load_model(None).layer_sizes == (24, 24)


def test_generation_imports_no_tensorflow() -> None:
    code = "import sys, chiptune_forge.generate, chiptune_forge.lstm; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -------------------------------------------------------------------------------------------------- CLI


def test_classic_magenta_command(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    write_model(run / "export")
    (run / "hparams.json").write_text("{}", encoding="utf-8")
    out = tmp_path / "gen"
    code = main(["generate", f"--run_dir={run}", '--hparams=batch_size=64,rnn_layer_sizes=[24,24]',
                 f"--output_dir={out}", "--num_outputs=3", "--num_steps=32", "--primer_melody=[20]",
                 "--condition_on_primer=true", "--inject_primer_during_generation=false"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "generate.json").read_text(encoding="utf-8"))
    assert [o["file"] for o in result["outputs"]] == ["output_01.mid", "output_02.mid", "output_03.mid"]
    first = result["outputs"][0]
    for key in ("seed", "num_notes", "num_steps", "seconds", "log_likelihood", "loop_score", "pitch_range",
                "notes_per_bar", "mean_polyphony", "scale_consistency", "empty_bar_fraction", "sparseness",
                "rank_score"):
        assert key in first
    assert first["num_steps"] == 32 and first["seconds"] == 4.0
    assert 0.0 <= result["mask_removed_mass"] <= 1.0
    assert sorted(o["rank"] for o in result["outputs"]) == [1, 2, 3]


def test_the_classic_command_runs_against_the_shipped_model(tmp_path: Path) -> None:
    """Training-only hparams (the default model trained at batch 32) do not stop a generation."""
    out = tmp_path / "gen"
    assert main(["generate", "--model=default", '--hparams=batch_size=64,rnn_layer_sizes=[128,128,128]',
                 f"--output_dir={out}", "--num_outputs=2", "--num_steps=16", "--primer_melody=[60]"]) == 0
    assert len(list(out.glob("*.mid"))) == 2


def test_primer_flags_without_a_primer_are_pointed_out(model_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--model", str(model_dir), "--output-dir", str(tmp_path), "--num-outputs", "1",
            "--num-steps", "8"]
    assert main([*base, "--inject-primer-during-generation", "--no-condition-on-primer"]) == 0
    assert ("warning: --inject-primer-during-generation and --no-condition-on-primer do nothing without a primer"
            in capsys.readouterr().err)
    assert main([*base, "--primer-melody=[60]", "--inject-primer-during-generation"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--hparams=rnn_layer_sizes=[128,128,128]"], "rnn_layer_sizes: given (128, 128, 128), the run has (24, 24)"),
    (["--hparams=batch_size=many"], "batch_size"),
    (["--hparams=batch_sise=64"], "batch_sise"),
    (["--primer-pitches=[60,130]"], "130 is not a MIDI pitch"),
    (["--primer-melody=[60,-2,-2,-2]", "--num-steps=3"], "the primer is 4 steps, longer than the num-steps (3) to"),
    (["--beam-size=0"], "beam-size must be a whole number of at least 1"),
    (["--branch_factor=0"], "branch-factor must be a whole number of at least 1"),
    (["--steps-per-iteration=0"], "steps-per-iteration must be"),
    (["--primer-melody=[60", "--num-steps=8"], "expected a list of whole numbers"),
    (["--temperature=-1"], "temperature must be"),
])
def test_bad_requests_fail_cleanly(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   extra: list[str], message: str) -> None:
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(model_dir), "--output-dir", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_unreadable_inputs_fail_cleanly(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gen"
    broken = tmp_path / "broken.mid"
    broken.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "hparams.json").write_text("{}", encoding="utf-8")
    cases = [
        (["--model", str(model_dir), "--primer-midi", str(broken)], "broken.mid"),
        (["--model", str(model_dir), "--primer-midi", str(tmp_path / "none.mid")], "cannot read file"),
        (["--run-dir", str(run)], "the run has no exported weights"),
        (["--model", str(tmp_path)], "not a model folder"),
    ]
    for extra, message in cases:
        assert main(["generate", "--output-dir", str(out), *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()


def test_outputs_without_notes_are_pointed_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_model(tmp_path / "m", step_end_bias=50.0)  # the argmax always closes the step
    assert main(["generate", "--model", str(folder), "--output-dir", str(tmp_path / "g"), "--num-outputs", "1",
                 "--bars", "1", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("wrote 1 MIDI file and ")
    assert err == ("chiptune-forge: warning: 1 of 1 outputs have no notes (the model ended or only closed steps; "
                   "give a primer or a higher --temperature)\n")


def test_a_generate_that_cannot_write_one_output_changes_none(model_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gen"
    base = ["generate", "--model", str(model_dir), "--output-dir", str(out), "--bars", "1"]
    assert main([*base, "--num-outputs", "3", "--seed", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "output_04.mid").mkdir()
    assert main([*base, "--num-outputs", "4", "--seed", "2", "--log", "ERROR"]) == 1
    err = capsys.readouterr().err
    assert err == f"chiptune-forge: error: {out / 'output_04.mid'}: is a folder; cannot write the file there\n"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before, "the seed-1 set is intact"
    assert main([*base, "--num-outputs", "2", "--log", "ERROR"]) == 0
    assert capsys.readouterr().out == "", "--log ERROR prints only warnings and errors"


def test_files_given_where_folders_belong_are_named(model_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    for extra, message in ((["--run-dir", str(tmp_path / "file"), "--output-dir", str(tmp_path / "g")],
                            f"{tmp_path / 'file'}: is a file, not a model or run folder"),
                           (["--model", str(model_dir), "--output-dir", str(tmp_path / "file")],
                            f"{tmp_path / 'file'}: is a file, not an output folder")):
        assert main(["generate", *extra]) == 1
        assert capsys.readouterr().err == f"chiptune-forge: error: {message}\n"
