"""Parity: the numpy engine's per-step logits equal the Keras network's, for one tiny model with random weights.

Kept apart from test_generate.py because it imports TensorFlow (seconds of start-up).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chiptune_forge.hparams import HParams
from chiptune_forge.lstm import load_model
from chiptune_forge.model.export import export_weights
from chiptune_forge.model.network import build_model

TOLERANCE = 1e-5


def test_numpy_logits_match_keras(tmp_path: Path) -> None:
    hparams = HParams(rnn_layer_sizes=(16, 12, 20))  # unequal widths catch any mixed-up weight layout
    net = build_model(hparams)
    rng = np.random.default_rng(0)
    for weight in net.weights:
        weight.assign(rng.normal(0.0, 0.4, weight.shape).astype(np.float32))
    export_weights(net, hparams, tmp_path, {"training_steps": 0})
    model = load_model(tmp_path)
    events = rng.integers(0, 259, size=(3, 60))
    expected = np.asarray(net(events.astype(np.int32), training=False))
    assert np.abs(expected).max() > 1.0  # the weights are large enough for the check to mean something

    for row in range(3):
        logits, _ = model.run(events[row])
        assert np.abs(logits - expected[row]).max() < TOLERANCE

    state = model.initial_state(3)
    for t in range(events.shape[1]):
        logits, state = model.step(events[:, t], state)
        assert np.abs(logits - expected[:, t]).max() < TOLERANCE
