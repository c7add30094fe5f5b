"""Training, resuming, stopping, evaluation and export of a tiny network on a synthetic dataset."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chiptune_forge.cli import main
from chiptune_forge.dataset import ShardWriter
from chiptune_forge.encoding import CONTINUED_NOTE, ENCODING_VERSION, END, NEW_NOTE, START, STEP_END
from chiptune_forge.errors import ChiptuneError
from chiptune_forge.hparams import HParams
from chiptune_forge.lstm import read_export
from chiptune_forge.model import train as train_module
from chiptune_forge.model.evaluate import model_from_export
from chiptune_forge.model.export import export_weights, model_card
from chiptune_forge.model.framework import tf
from chiptune_forge.model.network import build_model
from chiptune_forge.model.train import (
    BatchSchedule,
    TrainOptions,
    latest_checkpoint,
    make_chunks,
    pack_rows,
    train,
)

TINY = HParams(batch_size=4, rnn_layer_sizes=(16, 16), dropout_keep_prob=1.0, learning_rate=0.02)


def arpeggio(root: int, steps: int) -> np.ndarray:
    """A predictable piece: a note every other step, held for two steps, climbing a triad."""
    events = [START]
    for s in range(steps):
        pitch = root + (0, 4, 7)[(s // 2) % 3]
        events += [NEW_NOTE + pitch] if s % 2 == 0 else [CONTINUED_NOTE + pitch]
        events.append(STEP_END)
    return np.array([*events, END], dtype=np.int16)


def write_dataset(out: Path, train: list[np.ndarray], evals: list[np.ndarray]) -> Path:
    out.mkdir(parents=True)
    splits = {}
    for name, seqs in (("train", train), ("eval", evals)):
        writer = ShardWriter(out, name)
        for seq in seqs:
            writer.add(seq)
        writer.flush()
        writer.commit()
        splits[name] = {"shards": writer.shards, "sequences": writer.sequences, "events": writer.events}
    (out / "summary.json").write_text(json.dumps({"encoding": ENCODING_VERSION, "splits": splits}))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "ds"
    return write_dataset(root, [arpeggio(r, 20 + r % 7) for r in range(50, 70)],
                         [arpeggio(r, 24) for r in (55, 61, 66)])


def options(run: Path, data: Path, steps: int, **kw) -> TrainOptions:
    base = {"hparams": TINY, "given": frozenset({"batch_size"}), "num_training_steps": steps,
            "checkpoint_every": 1000, "evaluate": True, "max_length": 32, "show_progress": False}
    return TrainOptions(run_dir=run, dataset_dir=data, **(base | kw))


@pytest.fixture(scope="module")
def trained_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Train 3 steps, then resume the same run to 60; returns the run and both exports' descriptions."""
    run = tmp_path_factory.mktemp("runs") / "run"
    train(options(run, dataset, 3))
    first = json.loads((run / "export" / "model.json").read_text())
    train(options(run, dataset, 60, checkpoint_every=25))
    last = json.loads((run / "export" / "model.json").read_text())
    return run, first, last


def test_chunks_cover_every_next_event_pair_once() -> None:
    seqs = [np.arange(10, dtype=np.int16), np.arange(3, dtype=np.int16)]
    chunks = make_chunks(seqs, 4)
    assert [len(c) - 1 for c in chunks] == [4, 4, 1, 2]
    pairs = [(int(a), int(b)) for c in chunks for a, b in itertools.pairwise(c)]
    assert pairs == [(i, i + 1) for i in range(9)] + [(0, 1), (1, 2)]


def test_pack_rows_fills_rows_best_fit_longest_first() -> None:
    lengths = np.array([512, 300, 200, 212, 100, 5])
    assert pack_rows(lengths, 512, 1) == [[0], [1, 3], [2, 4, 5]]
    assert pack_rows(lengths, 512, 4) == [[0], [1], [2], [3], [4], [5]]  # packed, fewer rows than one batch
    assert pack_rows(lengths, 640, 1) == [[0, 4, 5], [1, 3], [2]]  # the fullest row that fits


def test_schedule_is_a_function_of_the_step_and_packs_short_chunks() -> None:
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 259, size=int(n)).astype(np.int32) for n in rng.integers(2, 300, size=200)]
    a, b = BatchSchedule(chunks, 8, seed=3), BatchSchedule(chunks, 8, seed=3)
    epoch = a.per_epoch
    for step in (0, 7, epoch + 5, epoch - 1, 0):  # epoch + 5 is in the second epoch
        assert all(np.array_equal(p, q) for p, q in zip(a.batch(step), b.batch(step), strict=True))
    seen, filled = [], []
    for step in range(epoch):
        x, y, mask, keep = a.batch(step)
        assert x.shape[1] % 128 == 0
        filled.append(mask.mean())
        for r in range(len(x)):
            real = int(mask[r].sum())
            assert mask[r, :real].all() and keep[r, 0] == 0  # chunks from the row's start on, then padding
            bounds = [*np.flatnonzero(keep[r] == 0), real]  # a chunk starts wherever keep is 0
            seen.extend((*x[r, s:e].tolist(), int(y[r, e - 1])) for s, e in itertools.pairwise(bounds))
    assert len(seen) == len(set(seen)) and set(seen) <= {tuple(c.tolist()) for c in chunks}  # each chunk once, whole
    assert len(seen) > 0.9 * len(chunks)  # only the rows of a last partial batch wait for the next epoch
    assert np.mean(filled) > 0.9  # packed rows in sorted pools leave little padding


def test_loss_falls_and_resume_continues_the_step_count(trained_run: tuple[Path, dict, dict]) -> None:
    run, first, last = trained_run
    assert first["training_steps"] == 3 and last["training_steps"] == 60
    assert last["eval"]["loss"] < first["eval"]["loss"] - 0.5
    assert latest_checkpoint(run).name == "ckpt-00000060.npz"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt-00000003.npz", "ckpt-00000025.npz", "ckpt-00000050.npz", "ckpt-00000060.npz"][-3:]
    assert any((run / "train").iterdir()) and any((run / "eval").iterdir())
    logged = {event.step for path in (run / "train").iterdir()
              for event in tf.compat.v1.train.summary_iterator(str(path))
              if any(value.tag == "loss" for value in event.summary.value)}
    assert logged == {3, 28, 53, 60}, "every 25 steps of each session and at its end, the last one included"
    config = json.loads((run / "hparams.json").read_text())
    assert config["encoding"] == ENCODING_VERSION and config["hparams"] == TINY.to_dict()


def final_weights(run: Path) -> dict[str, np.ndarray]:
    with np.load(latest_checkpoint(run)) as data:
        return {k: data[k] for k in data.files if k.startswith(("model_", "optimizer_", "random_"))}


def test_a_resumed_run_ends_with_the_weights_of_an_unbroken_one(dataset: Path, tmp_path: Path) -> None:
    """With dropout on: the seed fixes a new run's weights and masks, and a checkpoint carries the masks'
    random state, so stopping and resuming changes nothing."""
    dropout = dataclasses.replace(TINY, dropout_keep_prob=0.5)
    unbroken, again, resumed, other = (tmp_path / n for n in ("unbroken", "again", "resumed", "other"))
    train(options(unbroken, dataset, 6, hparams=dropout, evaluate=False))
    train(options(again, dataset, 6, hparams=dropout, evaluate=False))
    train(options(resumed, dataset, 3, hparams=dropout, evaluate=False))
    train(options(resumed, dataset, 6, hparams=dropout, evaluate=False))
    train(options(other, dataset, 6, hparams=dropout, evaluate=False, seed=1))
    want = final_weights(unbroken)
    assert any(k.startswith("random_") for k in want)
    for run in (again, resumed):
        got = final_weights(run)
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want), run.name
    assert not np.array_equal(final_weights(other)["model_0"], want["model_0"]), "another seed, other weights"


def test_a_checkpoint_without_random_states_still_resumes(dataset: Path, tmp_path: Path) -> None:
    """Checkpoints from before the dropout's random state was kept go on from a fresh one."""
    run = tmp_path / "run"
    train(options(run, dataset, 2, hparams=dataclasses.replace(TINY, dropout_keep_prob=0.5), evaluate=False))
    ckpt = latest_checkpoint(run)
    with np.load(ckpt) as data:
        kept = {k: data[k] for k in data.files if not k.startswith("random_")}
        assert len(kept) < len(data.files)
    with open(ckpt, "wb") as fh:
        np.savez(fh, **kept)
    assert train(options(run, dataset, 4, evaluate=False))["step"] == 4


def test_a_seed_out_of_range_is_refused(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ChiptuneError, match=r"seed must be 0 \.\. 4294967295, got -1"):
        train(options(tmp_path / "run", dataset, 1, seed=-1))
    with pytest.raises(SystemExit) as info:
        main(["train", "--run-dir", str(tmp_path / "cli"), "--dataset", str(dataset), "--seed", str(2**32)])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith("argument --seed: must be 0 .. 4294967295, got 4294967296\n")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cli").exists()


def test_resume_refuses_other_hparams(trained_run: tuple[Path, dict, dict], dataset: Path) -> None:
    run, _, _ = trained_run
    other = HParams(batch_size=4, rnn_layer_sizes=(32,))
    with pytest.raises(ChiptuneError, match="rnn_layer_sizes"):
        train(options(run, dataset, 61, hparams=other, given=frozenset({"rnn_layer_sizes"})))
    with pytest.raises(ChiptuneError, match=r"--seed 5 disagrees with the run's 0"):
        train(options(run, dataset, 61, seed=5))
    assert latest_checkpoint(run).name == "ckpt-00000060.npz", "refused before training"


def test_interrupt_writes_a_checkpoint_and_stops(dataset: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    original = BatchSchedule.batch

    def batch_then_interrupt(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step)

    monkeypatch.setattr(train_module.BatchSchedule, "batch", batch_then_interrupt)
    result = train(options(tmp_path / "run", dataset, 100, evaluate=False))
    assert result["step"] == 3 and result["stopped"]
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-00000003.npz"
    assert json.loads((tmp_path / "run" / "export" / "model.json").read_text())["training_steps"] == 3


def test_evaluate_json_has_the_fields(trained_run: tuple[Path, dict, dict], dataset: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    run, _, last = trained_run
    assert main(["evaluate", "--run-dir", str(run), "--dataset", str(dataset), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("loss", "perplexity", "accuracy", "events"):
        assert key in result
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    assert result["loss"] == pytest.approx(last["eval"]["loss"], rel=1e-4)
    assert main(["evaluate", "--model", str(run / "export"), "--dataset", str(dataset), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(result["loss"], rel=1e-4)


def numpy_logits(description: dict, arrays: dict[str, np.ndarray], events: np.ndarray) -> np.ndarray:
    """The exported model run with numpy alone, following the math written in model.json."""
    def sigmoid(v: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-v))

    x = arrays["embedding"][events]  # [B, T, E]
    for i, units in enumerate(description["layers"]):
        h = np.zeros((x.shape[0], units))
        c = np.zeros((x.shape[0], units))
        out = []
        for t in range(x.shape[1]):
            z = x[:, t] @ arrays[f"lstm{i}_kernel"] + h @ arrays[f"lstm{i}_recurrent"] + arrays[f"lstm{i}_bias"]
            zi, zf, zg, zo = np.split(z, 4, axis=-1)
            c = sigmoid(zf) * c + sigmoid(zi) * np.tanh(zg)
            h = sigmoid(zo) * np.tanh(c)
            out.append(h)
        x = np.stack(out, axis=1)
    return x @ arrays["dense_kernel"] + arrays["dense_bias"]


def test_exported_weights_give_the_keras_logits(tmp_path: Path) -> None:
    hp = HParams(rnn_layer_sizes=(24, 16, 20), dropout_keep_prob=0.5)
    model = build_model(hp)
    rng = np.random.default_rng(0)
    for w in model.weights:  # random non-trivial weights in every array
        w.assign(rng.normal(0.0, 0.3, size=w.shape).astype(np.float32))
    export_weights(model, hp, tmp_path / "m", {"training_steps": 7})
    description, arrays = read_export(tmp_path / "m")
    assert description["format"] == "chiptune-forge-lstm-1" and description["encoding"] == "polyphony-1"
    assert description["layers"] == [24, 16, 20] and description["embedding_dim"] == 24
    assert description["training_steps"] == 7 and description["num_classes"] == 259
    assert arrays["lstm1_kernel"].shape == (24, 64) and arrays["lstm1_recurrent"].shape == (16, 64)
    assert arrays["dense_kernel"].shape == (20, 259) and all(a.dtype == np.float32 for a in arrays.values())
    events = rng.integers(0, 259, size=(3, 40)).astype(np.int32)
    keras_logits = np.asarray(model(events, training=False))
    np.testing.assert_allclose(numpy_logits(description, arrays, events), keras_logits, atol=1e-5, rtol=0)
    reloaded, _ = model_from_export(tmp_path / "m")
    np.testing.assert_allclose(np.asarray(reloaded(events, training=False)), keras_logits, atol=1e-6, rtol=0)


def reference_lstm(x, keep, kernel, bias, recurrent):
    """Keras's LSTM math, time-major from zero state (again wherever `keep` [T, B] is 0), left to
    TensorFlow's own differentiation."""
    def step(carry, inputs):
        zx, k = inputs
        h, c = carry[0] * k[:, None], carry[1] * k[:, None]
        zi, zf, zg, zo = tf.split(zx + h @ recurrent, 4, axis=-1)
        c = tf.sigmoid(zf) * c + tf.sigmoid(zi) * tf.tanh(zg)
        return tf.sigmoid(zo) * tf.tanh(c), c

    zeros = tf.zeros([x.shape[1], recurrent.shape[0]])
    return tf.scan(step, (tf.einsum("tbi,ij->tbj", x, kernel) + bias, keep), initializer=(zeros, zeros))[0]


def some_starts(rng: np.random.Generator, steps: int, rows: int) -> tf.Tensor:
    """keep [T, B] for rows that each hold a few sequences one after another (0 where one starts)."""
    return tf.constant((rng.random((steps, rows)) > 0.2).astype(np.float32))


def assert_same_gradients(ours, reference, inputs: list, matmul_dtype: str) -> None:
    """`ours` and `reference` give the same outputs and gradients for every input under a weighted sum of
    the outputs: to float32 rounding, or to bfloat16's precision with its products."""
    results = []
    for fn in (ours, reference):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = fn(*inputs)
            weights = np.random.default_rng(4).normal(size=out.shape).astype(np.float32)  # the same for both
            loss = tf.reduce_sum(out * weights)
        results.append([out, *(tf.convert_to_tensor(g) for g in tape.gradient(loss, inputs))])
    for got, expected in zip(results[0], results[1], strict=True):
        scale = np.abs(expected.numpy()).max()
        tolerance = 1e-5 if matmul_dtype == "float32" else 0.02 * scale  # bfloat16: 8 bits
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=tolerance, rtol=0)


LOOPS = ["tensorflow", "native"]


def need_loops(loops: str, request: pytest.FixtureRequest) -> None:
    if loops == "native":
        request.getfixturevalue("native_loops")  # skips where there is no C++ compiler


@pytest.mark.parametrize("width", [6, 16])
@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_training_gradients_match_plain_autodiff(matmul_dtype: str, loops: str, width: int,
                                                 request: pytest.FixtureRequest) -> None:
    """The hand-written backward pass of an LSTM layer equals TensorFlow's own differentiation of the same
    math, for the inputs and every weight, with either recurrent loops, in rows that hold several
    sequences. (The native loops make the input products themselves for float32 inputs whose width is a
    multiple of 16, as every layer's after the first is.)"""
    from chiptune_forge.model.network import lstm_layer

    need_loops(loops, request)
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(9, 3, width)).astype(np.float32))
    kernel = tf.constant(rng.normal(0, 0.5, size=(width, 64)).astype(np.float32))
    bias = tf.constant(rng.normal(0, 0.5, size=(64,)).astype(np.float32))
    recurrent = tf.constant(rng.normal(0, 0.5, size=(16, 64)).astype(np.float32))
    keep = some_starts(rng, 9, 3)
    assert_same_gradients(lambda x, *w: lstm_layer(x, keep, *w, matmul_dtype=matmul_dtype, loops=loops),
                          lambda x, *w: reference_lstm(x, keep, *w), [x, kernel, bias, recurrent], matmul_dtype)


@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_first_layer_gradients_match_an_embedding_lookup_then_lstm(matmul_dtype: str, loops: str,
                                                                  request: pytest.FixtureRequest) -> None:
    """The first layer, which looks its input projections up in embedding @ kernel, trains exactly as an
    embedding lookup followed by an LSTM layer: the same outputs, and the same gradients for the embedding
    (repeated events included) and every weight."""
    from chiptune_forge.model.network import event_lstm_layer

    need_loops(loops, request)
    rng = np.random.default_rng(6)
    ids = tf.constant(rng.integers(0, 259, size=(9, 3)).astype(np.int32))
    ids = tf.tensor_scatter_nd_update(ids, [[1, 0], [4, 2]], [int(ids[0, 0]), int(ids[0, 0])])
    embeddings = tf.constant(rng.normal(0, 0.5, size=(259, 6)).astype(np.float32))
    kernel = tf.constant(rng.normal(0, 0.5, size=(6, 64)).astype(np.float32))
    bias = tf.constant(rng.normal(0, 0.5, size=(64,)).astype(np.float32))
    recurrent = tf.constant(rng.normal(0, 0.5, size=(16, 64)).astype(np.float32))
    keep = some_starts(rng, 9, 3)
    assert_same_gradients(
        lambda e, k, b, r: event_lstm_layer(ids, keep, e, k, b, r, matmul_dtype=matmul_dtype, loops=loops),
        lambda e, k, b, r: reference_lstm(tf.gather(e, ids), keep, k, b, r),
        [embeddings, kernel, bias, recurrent], matmul_dtype)


def test_row_groups_may_be_empty_and_batches_change_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """More row groups than rows (a last batch of 2 on a 4-core machine) after a bigger batch: the
    compiled loops, retraced for any batch size, still run forward and back."""
    from chiptune_forge.model import network

    monkeypatch.setattr(network, "LOOP_GROUPS", 4)
    rng = np.random.default_rng(3)
    kernel, bias, recurrent = (tf.constant(rng.normal(0, 0.5, size=s).astype(np.float32))
                               for s in ((6, 20), (20,), (5, 20)))
    for rows in (3, 2, 9, 1):
        x = tf.constant(rng.normal(size=(7, rows, 6)).astype(np.float32))
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = network.lstm_layer(x, tf.ones([7, rows]), kernel, bias, recurrent)
        assert out.shape == (7, rows, 5) and tape.gradient(out, x).shape == (7, rows, 6)


def test_masked_loss_equals_tensorflows_cross_entropy_and_its_gradient() -> None:
    """The compiled loss gives TensorFlow's masked mean softmax cross-entropy, argmax accuracy and the
    gradient TensorFlow's differentiation gives, with masked-out positions contributing nothing."""
    from chiptune_forge.model.network import masked_loss

    rng = np.random.default_rng(5)
    logits = tf.constant(rng.normal(0, 3, size=(3, 7, 259)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 259, size=(3, 7)).astype(np.int32))
    mask = tf.constant((rng.random((3, 7)) < 0.7).astype(np.float32))
    results = []
    for fn in (masked_loss, None):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            if fn is not None:
                loss, accuracy = fn(logits, labels, mask)
            else:
                ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
                loss = tf.reduce_sum(ce * mask) / tf.reduce_sum(mask)
                hit = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32)
                accuracy = tf.reduce_sum(hit * mask) / tf.reduce_sum(mask)
        results.append((float(loss), float(accuracy), tape.gradient(loss, logits).numpy()))
    (loss, accuracy, grad), (ref_loss, ref_accuracy, ref_grad) = results
    assert loss == pytest.approx(ref_loss, rel=1e-6) and accuracy == ref_accuracy
    np.testing.assert_allclose(grad, ref_grad, atol=1e-7, rtol=0)
    assert not grad[mask.numpy() == 0].any()


@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_dropout16_keeps_the_asked_share_and_the_expected_value(keep: float) -> None:
    from chiptune_forge.model.network import Dropout16

    layer = Dropout16(1.0 - keep)
    x = tf.constant(np.random.default_rng(1).uniform(1, 2, size=(101, 33, 61)).astype(np.float32))  # odd size
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x, training=True)
    kept = out.numpy() != 0
    resolved = round(keep * 65536) / 65536
    assert abs(kept.mean() - keep) < 0.005
    np.testing.assert_allclose(out.numpy()[kept], x.numpy()[kept] / resolved, rtol=1e-6)
    grad = tape.gradient(out, x).numpy()
    np.testing.assert_allclose(grad, kept / resolved, rtol=1e-6)
    assert (layer(x, training=True).numpy() != 0).tolist() != kept.tolist()  # a fresh mask every call
    assert layer(x, training=False) is x and Dropout16(0.0)(x, training=True) is x


def test_bfloat16_products_are_picked_only_where_the_cpu_has_amx(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(train_module, "CPUINFO", cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_int8\n")
    assert not train_module.hardware_bfloat16(), "AVX-512 bfloat16 alone is no faster than float32 here"
    assert train_module.resolve_matmul_precision("auto") == "float32"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n")
    assert train_module.hardware_bfloat16()
    assert train_module.resolve_matmul_precision("auto") == "bfloat16"
    assert train_module.resolve_matmul_precision("float32") == "float32", "a given precision is kept"
    cpuinfo.unlink()
    assert not train_module.hardware_bfloat16(), "no /proc/cpuinfo (not Linux): float32"


def test_the_matmul_precision_of_a_run_is_recorded(dataset: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for precision in ("bfloat16", "float32"):
        run = tmp_path / precision
        assert main(["train", "--run-dir", str(run), "--dataset", str(dataset), "--hparams",
                     "rnn_layer_sizes=[8],batch_size=4", "--num-training-steps", "3",
                     "--matmul-precision", precision]) == 0
        description = json.loads((run / "export" / "model.json").read_text())
        assert description.get("matmul_precision", "float32") == precision
        card = model_card(description)
        assert ("large matrix products in bfloat16" in card) == (precision == "bfloat16")
        err = capsys.readouterr().err
        assert ("large matrix products in bfloat16" in err) == (precision == "bfloat16")
    # a run resumed in the other precision says it used both
    assert main(["train", "--run-dir", str(tmp_path / "float32"), "--dataset", str(dataset), "--num-training-steps",
                 "4", "--matmul-precision", "bfloat16"]) == 0
    description = json.loads((tmp_path / "float32" / "export" / "model.json").read_text())
    assert description["matmul_precision"] == "float32 and bfloat16"
    assert "large matrix products in float32 and bfloat16" in model_card(description)


def test_model_card_carries_the_recorded_numbers(trained_run: tuple[Path, dict, dict]) -> None:
    _, _, last = trained_run
    card = model_card(last)
    assert "steps: 60," in card and f"{last['eval']['loss']:.4f}" in card and "batch_size=4" in card
    # a user's model is described by its own data, not as the shipped model trained on VGMIDI
    assert card.startswith("# chiptune-forge model\n") and "VGMIDI" not in card and "train_default_model" not in card
    shipped = model_card(last, default=True)
    assert shipped.startswith("# chiptune-forge default model\n") and "VGMIDI" in shipped


def test_missing_default_model_is_a_clean_error(tmp_path: Path, dataset: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", str(tmp_path), "--dataset", str(dataset)]) == 1
    assert "model.json" in capsys.readouterr().err


def test_a_refused_start_leaves_no_run_behind(dataset: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--dataset", str(dataset), "--hparams",
                 "rnn_layer_sizes=[8],batch_size=100000", "--num-training-steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(dataset) in err and "fewer than batch_size=100000" in err
    assert not (run / "hparams.json").exists()
    assert main(["train", "--run-dir", str(run), "--dataset", str(dataset), "--hparams",
                 "rnn_layer_sizes=[8],batch_size=4", "--num-training-steps", "1"]) == 0


def test_a_run_that_never_saved_a_checkpoint_takes_new_hparams(dataset: Path, tmp_path: Path) -> None:
    """A start that failed after writing hparams.json (say the loss blew up at once) holds nothing to resume."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "hparams.json").write_text(json.dumps({"encoding": ENCODING_VERSION, "hparams": HParams().to_dict(),
                                                  "max_length": 512, "seed": 0, "dataset": str(dataset)}))
    train(options(run, dataset, 1, evaluate=False))
    assert json.loads((run / "hparams.json").read_text())["hparams"]["rnn_layer_sizes"] == [16, 16]


def test_a_damaged_checkpoint_is_one_line(trained_run: tuple[Path, dict, dict], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert main(["export", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{ckpt}: damaged checkpoint" in err


def test_wrong_paths_are_reported_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    cases = [(["evaluate", "--dataset", str(tmp_path / "nope")], "nope: no such dataset folder"),
             (["export", "--run-dir", str(tmp_path / "nope")], "nope: no such run folder"),
             (["export", "--run-dir", str(tmp_path)], "not a training run folder (no hparams.json)"),
             (["train", "--run-dir", str(tmp_path / "file"), "--dataset", str(tmp_path / "nope")],
              "nope: no such dataset folder")]
    for argv, message in cases:
        assert main(argv) == 1, argv
        assert message in capsys.readouterr().err, argv


def test_shipped_default_model_is_complete_and_small() -> None:
    from chiptune_forge.lstm import resolve_model_dir

    folder = resolve_model_dir("default")
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 10 * 1024 * 1024
    description, arrays = read_export(folder)
    assert (folder / "MODEL_CARD.md").is_file()
    layers, width = description["layers"], description["embedding_dim"]
    assert arrays["embedding"].shape == (259, width)
    inputs = [width, *layers[:-1]]
    for i, units in enumerate(layers):
        assert arrays[f"lstm{i}_kernel"].shape == (inputs[i], 4 * units)
        assert arrays[f"lstm{i}_recurrent"].shape == (units, 4 * units)
        assert arrays[f"lstm{i}_bias"].shape == (4 * units,)
    assert arrays["dense_kernel"].shape == (layers[-1], 259)
    assert description["training_steps"] > 0 and description["eval"]["loss"] < 4.0
    logits = numpy_logits(description, arrays, np.array([[START, NEW_NOTE + 60, STEP_END]]))
    assert np.isfinite(logits).all()


def test_tensorflow_start_up_chatter_is_kept_off_stderr() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    code = ("import sys; from chiptune_forge.model.framework import tf; "
            "print('after the import', file=sys.stderr); print(tf.constant(2.0).numpy())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2.0"
    assert done.stderr == "after the import\n"


def test_a_failing_tensorflow_import_keeps_its_diagnostics(tmp_path: Path) -> None:
    (tmp_path / "keras.py").write_text("import os\nos.write(2, b'E0000 broken install: libfoo.so missing\\n')\n"
                                       "raise ImportError('keras is broken here')\n")
    env = {**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
           "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-c", "import chiptune_forge.model.framework"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "E0000 broken install: libfoo.so missing" in done.stderr and "keras is broken here" in done.stderr


def test_only_tensorflow_info_lines_count_as_chatter() -> None:
    from chiptune_forge.model.framework import _CHATTER

    assert _CHATTER.match("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    assert _CHATTER.match("I0000 00:00:1795754566.894543    9547 port.cc:153] oneDNN custom operations are on.")
    assert not _CHATTER.match("E0000 00:00:1795754594.788571    9638 cuda_platform.cc:52] failed call to cuInit")
    assert not _CHATTER.match("UserWarning: something the user should see")


def test_a_file_where_the_run_keeps_a_folder_is_refused_before_training(dataset: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    assert main(["train", "--run-dir", str(run), "--dataset", str(dataset), "--hparams",
                 "rnn_layer_sizes=[8],batch_size=4", "--num-training-steps", "2"]) == 1
    err = capsys.readouterr().err
    assert err == (f"chiptune-forge: error: {run / 'checkpoints'}: is a file where the run keeps a folder; move it "
                   "away\n")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"], "nothing written, nothing trained"


def test_a_damaged_dataset_summary_is_one_line_for_train(dataset: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    broken = tmp_path / "data"
    shutil.copytree(dataset, broken)
    for text in ("{bad", "[1, 2]", '{"encoding": "polyphony-1", "splits": {"train": {"shards": 3}}}'):
        (broken / "summary.json").write_text(text)
        assert main(["train", "--run-dir", str(tmp_path / "run"), "--dataset", str(broken),
                     "--num-training-steps", "1"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"chiptune-forge: error: {broken / 'summary.json'}: damaged dataset summary") and \
            err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_train_takes_magentas_checkpoint_and_summary_flags(dataset: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--run_dir", str(run), "--sequence_example_file", str(dataset), "--hparams",
                 "rnn_layer_sizes=[8],batch_size=4", "--num_training_steps", "4", "--checkpoint-every", "1",
                 "--num_checkpoints", "2", "--summary_frequency", "2", "--log", "ERROR"]) == 0
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["ckpt-00000003.npz", "ckpt-00000004.npz"]
    assert "step 2:" not in capsys.readouterr().err, "--log ERROR prints no progress"
    assert main(["train", "--run-dir", str(run), "--dataset", str(dataset), "--num-training-steps", "4"]) == 0
    assert capsys.readouterr().out == "", "nothing to do: nothing exported, nothing to report"
    assert main(["train", "--run-dir", str(run), "--dataset", str(dataset), "--num-checkpoints", "0"]) == 1
    assert "--num-checkpoints must be at least 1, got 0" in capsys.readouterr().err


def test_evaluate_refuses_weights_that_do_not_match_model_json(
        trained_run: tuple[Path, dict, dict], dataset: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    export = tmp_path / "export"
    shutil.copytree(trained_run[0] / "export", export)
    description = json.loads((export / "model.json").read_text())
    (export / "model.json").write_text(json.dumps({**description, "layers": [32, 32]}))
    assert main(["evaluate", "--model", str(export), "--dataset", str(dataset)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.json lists layers [32, 32] but the weights have" in err


def test_an_export_that_cannot_be_written_names_the_file_and_leaves_no_temporary(
        trained_run: tuple[Path, dict, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    (run / "export" / "weights.npz").unlink()
    (run / "export" / "weights.npz").mkdir()
    assert main(["export", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert err == f"chiptune-forge: error: {run / 'export' / 'weights.npz'}: is a folder; cannot write the file there\n"
    assert sorted(p.name for p in (run / "export").iterdir()) == ["model.json", "weights.npz"], "no temporary left"


def test_resuming_on_other_data_says_so_and_records_it(trained_run: tuple[Path, dict, dict], dataset: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(trained_run[0], run)
    shutil.copytree(dataset, other)
    capsys.readouterr()
    train(options(run, other, 61, evaluate=False))
    assert f"note: {run} was trained on {dataset.resolve()} so far; it goes on with {other}" in capsys.readouterr().err
    config = json.loads((run / "hparams.json").read_text())
    exported = json.loads((run / "export" / "model.json").read_text())
    assert config["dataset"] == str(other.resolve()) and config["dataset_summary"]["path"] == str(other)
    assert exported["dataset"] == config["dataset_summary"], "the run and its export name the same data"


def test_native_loops_refuse_layer_sizes_they_cannot_run(dataset: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--dataset", str(dataset), "--hparams",
            "rnn_layer_sizes=[20],batch_size=4", "--num-training-steps", "2"]
    assert main([*args, "--loops", "native"]) == 1
    err = capsys.readouterr().err
    assert "--loops native: rnn_layer_sizes has 20, which is not a multiple of 16" in err
    assert "Traceback" not in err and not run.exists()
    assert main(args) == 0, "auto falls back to TensorFlow's loops"
    assert "note: training uses TensorFlow's recurrent loops, which are slower: rnn_layer_sizes has 20" in (
        capsys.readouterr().err)


def test_a_run_records_its_loops_and_a_switch_is_noted(dataset: Path, tmp_path: Path, native_loops,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    first = train(options(run, dataset, 2, evaluate=False, loops="tensorflow"))
    assert first["loops"] == "tensorflow"
    again = train(options(run, dataset, 3, evaluate=False, show_progress=True))
    assert again["loops"] == "native and tensorflow"
    assert f"note: {run} was trained with tensorflow recurrent loops so far and goes on with native ones" in (
        capsys.readouterr().err)
