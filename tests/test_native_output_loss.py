"""The native output layer and masked cross-entropy of training (chiptune_forge/model/output_loss.cc)."""

from __future__ import annotations

import numpy as np
import pytest

from chiptune_forge.hparams import HParams


def reference(hidden, kernel, bias, labels, mask):
    """The output layer and its masked mean cross-entropy in float64: loss, accuracy and the gradients with
    respect to the hidden states, the kernel and the bias."""
    h = hidden.reshape(-1, kernel.shape[0]).astype(np.float64)
    logits = h @ kernel + bias
    y, m = labels.reshape(-1), mask.reshape(-1).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = (-np.log(p[rows, y]) * m).sum() / m.sum()
    accuracy = ((logits.argmax(axis=1) == y) * m).sum() / m.sum()
    d = p.copy()
    d[rows, y] -= 1.0
    d *= (m / m.sum())[:, None]
    return loss, accuracy, (d @ kernel.T).reshape(hidden.shape), h.T @ d, d.sum(axis=0)


def inputs(steps: int, rows: int, width: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    mask = (rng.random((steps, rows)) < 0.7).astype(np.float32)
    mask.flat[0] = 1.0
    labels = rng.integers(0, classes, size=(steps, rows)).astype(np.int32)
    labels[mask == 0] = -5  # never read where the mask is 0
    return (rng.normal(size=(steps, rows, width)).astype(np.float32),
            rng.normal(0, 0.5, size=(width, classes)).astype(np.float32),
            rng.normal(0, 0.5, size=classes).astype(np.float32), labels, mask)


@pytest.mark.parametrize(("steps", "rows", "width", "classes", "threads"),
                         [(40, 64, 128, 259, 2), (9, 5, 16, 259, 3), (1, 1, 32, 3, 1), (700, 3, 16, 17, 4)])
def test_output_loss_gives_the_masked_cross_entropy_and_its_gradients(native_loops, steps: int, rows: int,
                                                                     width: int, classes: int, threads: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_loops, "threads", threads)
    args = inputs(steps, rows, width, classes)
    got = native_loops.output_loss(*args)
    want = reference(*args)
    assert got[0] == pytest.approx(want[0], rel=1e-5) and got[1] == pytest.approx(want[1], abs=1e-6)
    for g, w in zip(got[2:], want[2:], strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max(), rtol=0)
    d_hidden = got[2]
    assert not d_hidden[args[4] == 0].any()  # padding gets no gradient


def test_output_loss_does_not_depend_on_the_number_of_threads(native_loops, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    args = inputs(300, 16, 32, 259, seed=3)  # several groups of rows
    results = []
    for threads in (1, 2, 5):
        monkeypatch.setattr(native_loops, "threads", threads)
        results.append([np.array(r) for r in native_loops.output_loss(*args)])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_output_loss_counts_ties_for_the_first_largest_logit(native_loops) -> None:
    """Accuracy takes the first of equal largest logits as the prediction, as TensorFlow's argmax does."""
    hidden = np.zeros((1, 2, 16), np.float32)  # all logits equal to the bias
    kernel = np.zeros((16, 20), np.float32)
    bias = np.zeros(20, np.float32)
    bias[[3, 11]] = 1.0
    _, accuracy, *_ = native_loops.output_loss(hidden, kernel, bias, np.array([[3, 11]], np.int32),
                                               np.ones((1, 2), np.float32))
    assert accuracy == pytest.approx(0.5)


def test_output_loss_refuses_a_label_outside_the_classes(native_loops) -> None:
    hidden, kernel, bias, labels, mask = inputs(4, 3, 16, 10)
    labels[0, 0] = 10
    with pytest.raises(ValueError, match="a label outside them"):
        native_loops.output_loss(hidden, kernel, bias, labels, mask)


def test_training_loss_with_native_kernels_matches_tensorflow(native_loops) -> None:
    """The loss, accuracy and weight gradients of a training step with the native loops and output layer
    equal those of TensorFlow's loops and output layer, in a compiled step over padded batches of changing
    shape whose rows hold several sequences."""
    from chiptune_forge.model.framework import keras, tf
    from chiptune_forge.model.network import build_model, training_loss

    hparams = HParams(rnn_layer_sizes=(32, 16), dropout_keep_prob=1.0)
    steps = {}
    for loops in ("native", "tensorflow"):
        keras.utils.set_random_seed(5)
        model = build_model(hparams, loops=loops)
        loss_of = training_loss(model)

        @tf.function(reduce_retracing=True)
        def step(x, y, mask, keep, model=model, loss_of=loss_of):
            with tf.GradientTape() as tape:
                loss, accuracy = loss_of(x, y, mask, keep)
            return loss, accuracy, tape.gradient(loss, model.trainable_variables)

        steps[loops] = step
    rng = np.random.default_rng(7)
    for rows, length in ((6, 40), (9, 17), (6, 40)):
        x = rng.integers(0, 259, size=(rows, length)).astype(np.int32)
        y = rng.integers(0, 259, size=(rows, length)).astype(np.int32)
        mask = (np.arange(length)[None, :] < rng.integers(1, length + 1, size=(rows, 1))).astype(np.float32)
        keep = (rng.random((rows, length)) > 0.1).astype(np.float32)
        got, want = steps["native"](x, y, mask, keep), steps["tensorflow"](x, y, mask, keep)
        assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-5)
        assert float(got[1]) == pytest.approx(float(want[1]), abs=1e-6)
        for g, w in zip(got[2], want[2], strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5 * float(np.abs(w).max()), rtol=0)
