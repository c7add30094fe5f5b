"""The native recurrent loops of training (chiptune_forge/model/lstm_loops.cc through model/native.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chiptune_forge.hparams import HParams
from chiptune_forge.model import native


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def reference(xproj, keep, bias, recurrent, dhs):
    """Keras's LSTM math in float64, forward from zero state (again wherever `keep` is 0) and back: hidden
    states, the gradients of the gate pre-activations and the bias gradient."""
    steps, rows, gates = xproj.shape
    u = gates // 4
    h, c = np.zeros((rows, u)), np.zeros((rows, u))
    saved, hs = [], []
    for t in range(steps):
        if t:
            h, c = h * keep[t][:, None], c * keep[t][:, None]
        z = xproj[t] + bias + h @ recurrent
        i, f, g, o = sigmoid(z[:, :u]), sigmoid(z[:, u:2 * u]), np.tanh(z[:, 2 * u:3 * u]), sigmoid(z[:, 3 * u:])
        saved.append((i, f, g, o, c))
        c = f * c + i * g
        h = o * np.tanh(c)
        hs.append(h)
    dz = np.zeros((steps, rows, gates))
    dh_next, dc_next = np.zeros((rows, u)), np.zeros((rows, u))
    for t in reversed(range(steps)):
        i, f, g, o, c_prev = saved[t]
        c = f * c_prev + i * g
        tc = np.tanh(c)
        dh = dhs[t] + dh_next
        dc = dc_next + dh * o * (1 - tc * tc)
        dz[t] = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                                dh * tc * o * (1 - o)], axis=-1)
        dh_next, dc_next = dz[t] @ recurrent.T * keep[t][:, None], dc * f * keep[t][:, None]
    return np.array(hs), dz, dz.sum(axis=(0, 1))


def inputs(steps: int, rows: int, units: int, seed: int = 0):
    """Projections, keep (about one step in eight starts a new sequence), bias, recurrent kernel and the
    gradients of the hidden states."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(steps, rows, 4 * units)).astype(np.float32),
            (rng.random((steps, rows)) > 0.125).astype(np.float32),
            rng.normal(0, 0.3, size=4 * units).astype(np.float32),
            rng.normal(0, 0.3, size=(units, 4 * units)).astype(np.float32),
            rng.normal(size=(steps, rows, units)).astype(np.float32))


@pytest.mark.parametrize(("steps", "rows", "units", "threads"),
                         [(37, 13, 32, 3), (5, 1, 16, 2), (1, 7, 16, 1), (60, 64, 128, 2)])
def test_loops_give_the_lstm_math(native_loops, steps: int, rows: int, units: int, threads: int,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_loops, "threads", threads)
    xproj, keep, bias, recurrent, dhs = inputs(steps, rows, units)
    if rows == 1:
        keep[:] = 1.0  # one sequence through every step
    want_hs, want_dz, want_bias = reference(xproj, keep, bias, recurrent, dhs)
    hs, h_prev, derivs, cell = native_loops.forward(xproj, keep, bias, recurrent)
    dz, partial, _ = native_loops.backward(keep, dhs, derivs, cell, recurrent)
    np.testing.assert_allclose(hs, want_hs, atol=1e-5, rtol=0)  # float32 sums of up to 128 terms per step
    np.testing.assert_array_equal(h_prev[0], 0.0)
    np.testing.assert_array_equal(h_prev[1:], hs[:-1] * keep[1:, :, None])
    np.testing.assert_allclose(dz, want_dz, atol=2e-5 * np.abs(want_dz).max(), rtol=0)
    np.testing.assert_allclose(partial.sum(axis=0), want_bias, atol=1e-4 * np.abs(want_bias).max(), rtol=0)


def test_loops_make_the_input_projections_themselves(native_loops, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given the inputs and their kernel, or event ids and a table of projections, the loops give what they
    give for the projections computed beforehand (with the kernel, each step's inputs also come back next
    to its previous hidden states); with the kernel, the backward loop also gives the inputs' gradient."""
    monkeypatch.setattr(native_loops, "threads", 2)
    _, keep, bias, recurrent, dhs = inputs(23, 11, 32, seed=5)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(23, 11, 48)).astype(np.float32)
    kernel = rng.normal(0, 0.2, size=(48, 128)).astype(np.float32)
    ids = rng.integers(0, 40, size=(23, 11)).astype(np.int32)
    table = rng.normal(size=(40, 128)).astype(np.float32)
    for given, projections, extra in ((x, np.einsum("tbi,ij->tbj", x, kernel), {"kernel": kernel}),
                                      (table, table[ids], {"ids": ids})):
        want = native_loops.forward(projections, keep, bias, recurrent)
        got = list(native_loops.forward(given, keep, bias, recurrent, **extra))
        if "kernel" in extra:  # each step's inputs come before its previous hidden states
            np.testing.assert_array_equal(got[1][..., :48], x)
            got[1] = got[1][..., 48:]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)  # the products' sums in another order
        dz, _, dx = native_loops.backward(keep, dhs, *got[2:], recurrent, kernel=extra.get("kernel"))
        if "kernel" in extra:
            np.testing.assert_allclose(dx, dz @ kernel.T, atol=1e-5 * np.abs(dx).max(), rtol=0)
        else:
            assert dx.shape == (23, 11, 0)
    with pytest.raises(ValueError, match=r"event ids must be in \[0, 40\)"):
        native_loops.forward(table, keep, bias, recurrent, ids=ids + 1)


def test_dropout_in_the_loops(native_loops, monkeypatch: pytest.MonkeyPatch) -> None:
    """With dropout the forward loop's output is its hidden states times 0 or 65536 / threshold, kept about
    threshold / 65536 of the time as the seed draws it, on any number of threads; the backward loop applies
    the same mask to the gradients it is given."""
    xproj, keep, bias, recurrent, dhs = inputs(50, 9, 32, seed=7)
    hs = native_loops.forward(xproj, keep, bias, recurrent)[0].copy()
    quarter = np.array([16384, 11, 7], np.uint32)  # keep a quarter, scaled by 4
    results = []
    for threads in (1, 2, 5):
        monkeypatch.setattr(native_loops, "threads", threads)
        out, _, derivs, cell = native_loops.forward(xproj, keep, bias, recurrent, dropout=quarter)
        dz = native_loops.backward(keep, dhs, derivs, cell, recurrent, dropout=quarter)[0]
        results.append((out.copy(), dz.copy()))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            np.testing.assert_array_equal(got, want)
    out, dz = results[0]
    mask = np.where(out != 0, 4.0, 0.0).astype(np.float32)
    np.testing.assert_array_equal(out, hs * mask)
    assert abs(np.mean(mask > 0) - 0.25) < 0.02
    np.testing.assert_array_equal(dz, native_loops.backward(keep, dhs * mask, derivs, cell, recurrent)[0])
    reseeded = native_loops.forward(xproj, keep, bias, recurrent, dropout=np.array([16384, 11, 8], np.uint32))[0]
    assert 0.5 < np.mean((reseeded != 0) == (out != 0)) < 0.75  # another seed, another mask


def test_results_do_not_depend_on_the_number_of_threads(native_loops, monkeypatch: pytest.MonkeyPatch) -> None:
    xproj, keep, bias, recurrent, dhs = inputs(40, 22, 32, seed=1)
    results = []
    for threads in (1, 2, 5):
        monkeypatch.setattr(native_loops, "threads", threads)
        hs, _, derivs, cell = native_loops.forward(xproj, keep, bias, recurrent)
        dz, partial, _ = native_loops.backward(keep, dhs, derivs, cell, recurrent)
        results.append([a.copy() for a in (hs, dz, partial)])
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            np.testing.assert_array_equal(got, want)


def test_memory_is_reused_only_after_it_is_released(native_loops) -> None:
    """The loops' outputs share recycled buffers with TensorFlow; a buffer still seen through its array
    must not be written by a later call."""
    first = inputs(30, 8, 16, seed=2)
    hs, h_prev, derivs, cell = native_loops.forward(*first[:4])
    kept = [a.copy() for a in (hs, h_prev, derivs, cell)]
    del hs, derivs, cell  # their buffers go back to the pool; h_prev's stays out
    for seed in (3, 4):
        other = inputs(30, 8, 16, seed=seed)
        native_loops.forward(*other[:4])
    np.testing.assert_array_equal(h_prev, kept[1])
    again = native_loops.forward(*first[:4])  # released buffers are taken again, and give the same results
    for got, want in zip(again, kept, strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_library_is_built_once_into_the_cache(native_loops, native_cache: Path) -> None:
    built = list((native_cache / "chiptune-forge").glob("training_kernels-*.so"))
    assert len(built) == 1
    assert not list((native_cache / "chiptune-forge").glob("*.partial"))


def test_resolve_loops(native_loops, monkeypatch: pytest.MonkeyPatch) -> None:
    from chiptune_forge.errors import ChiptuneError
    from chiptune_forge.model.train import resolve_loops

    even, odd = HParams(rnn_layer_sizes=(64, 32)), HParams(rnn_layer_sizes=(64, 100))
    assert resolve_loops("auto", even) == ("native", None)
    assert resolve_loops("native", even) == ("native", None)
    assert resolve_loops("tensorflow", even) == ("tensorflow", None)
    loops, note = resolve_loops("auto", odd)
    assert loops == "tensorflow" and "100" in note and "multiple of 16" in note
    with pytest.raises(ChiptuneError, match="--loops native: rnn_layer_sizes has 100"):
        resolve_loops("native", odd)


@pytest.fixture
def fresh_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """native.load() with its memo cleared and an empty cache folder, restored afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.load.cache_clear()
    yield native.load
    native.load.cache_clear()


def test_without_a_compiler_training_falls_back_and_says_why(fresh_load, monkeypatch: pytest.MonkeyPatch) -> None:
    from chiptune_forge.errors import ChiptuneError
    from chiptune_forge.model.train import resolve_loops

    monkeypatch.setattr(native, "find_compiler", lambda: None)
    loops, note = resolve_loops("auto", HParams())
    assert loops == "tensorflow" and "no C++ compiler found" in note
    with pytest.raises(ChiptuneError, match="--loops native: no C\\+\\+ compiler found"):
        resolve_loops("native", HParams())


def test_a_failed_build_is_reported_and_leaves_nothing_behind(fresh_load, monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    script = tmp_path / "broken-c++"
    script.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'broken 1.0' && exit 0\n"
                      "echo 'lstm_loops.cc:1: error: no such luck' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    why = fresh_load()
    assert isinstance(why, str) and why.startswith("building the native loops failed:")
    assert "error: no such luck" in why
    assert not list((tmp_path / "chiptune-forge").iterdir())


def test_a_compiled_training_step_matches_tensorflow_loops(native_loops) -> None:
    """In a graph, TensorFlow shares the loops' output buffers instead of copying them, and the buffers are
    recycled from step to step: gradients of a two-layer network over batches of changing shape still match
    those of TensorFlow's loops."""
    from chiptune_forge.model.framework import keras, tf
    from chiptune_forge.model.network import build_model

    hparams = HParams(rnn_layer_sizes=(32, 16), dropout_keep_prob=1.0)
    steps = {}
    for loops in ("native", "tensorflow"):
        keras.utils.set_random_seed(5)
        model = build_model(hparams, loops=loops)

        @tf.function(reduce_retracing=True)
        def gradients(x, model=model):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(x, logits, from_logits=True))
            return tape.gradient(loss, model.trainable_variables)

        steps[loops] = gradients
    rng = np.random.default_rng(7)
    for rows, length in ((6, 40), (9, 17), (6, 40), (3, 64)):
        x = rng.integers(0, 259, size=(rows, length)).astype(np.int32)
        for got, want in zip(steps["native"](x), steps["tensorflow"](x), strict=True):
            scale = float(np.abs(want).max())
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * scale, rtol=0)


def test_sizes_the_loops_cannot_take_are_refused(native_loops) -> None:
    xproj, keep, bias, recurrent, dhs = inputs(5, 3, 16)
    with pytest.raises(ValueError, match="multiples of 16, not 20"):
        native_loops.forward(np.zeros((5, 3, 80), np.float32), keep, np.zeros(80, np.float32),
                             np.zeros((20, 80), np.float32))
    with pytest.raises(ValueError, match="multiples of 16, not 8"):
        native_loops.backward(keep, np.zeros((5, 3, 8), np.float32), np.zeros((5, 3, 32), np.float32),
                              np.zeros((5, 3, 16), np.float32), np.zeros((8, 32), np.float32))
    hs, _, derivs, cell = native_loops.forward(xproj[:0], keep[:0], bias, recurrent)  # no steps: nothing to do
    assert hs.shape == (0, 3, 16)
    assert native_loops.backward(keep[:0], dhs[:0], derivs, cell, recurrent)[0].shape == (0, 3, 64)


def test_cxx_may_hold_a_command_with_arguments(fresh_load, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    compiler = native.find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("CXX", f"env {compiler}")
    assert isinstance(fresh_load(), native.NativeKernels)
    assert len(list((tmp_path / "chiptune-forge").glob("training_kernels-*.so"))) == 1
