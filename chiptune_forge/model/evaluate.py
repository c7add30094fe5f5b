"""Loss, perplexity and accuracy of a model over a dataset split, on whole sequences.

Sequences are scored whole (each from its START event with a fresh state), batched by similar length so
little time goes to padding, and padded positions never count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..dataset import load_split
from ..encoding import DEFAULT_EVENT
from ..errors import ChiptuneError
from .framework import tf
from .network import build_model

EVAL_ROWS = 16
PAD_MULTIPLE = 256


def padded_batches(sequences: list[np.ndarray], rows: int, max_length: int | None = None,
                   pad_multiple: int = PAD_MULTIPLE):
    """(inputs, labels, mask) batches of next-event pairs, sequences sorted by length.

    A sequence longer than max_length positions is cut into consecutive chunks, each scored from a fresh state.
    """
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int32)
        n = len(seq) - 1
        step = max_length or max(n, 1)
        pairs.extend((seq[a:a + step], seq[a + 1:a + 1 + step]) for a in range(0, n, step))
    pairs.sort(key=lambda p: len(p[0]))
    for first in range(0, len(pairs), rows):
        group = pairs[first:first + rows]
        width = -(-len(group[-1][0]) // pad_multiple) * pad_multiple
        x = np.full((len(group), width), DEFAULT_EVENT, dtype=np.int32)
        y = np.full((len(group), width), DEFAULT_EVENT, dtype=np.int32)
        mask = np.zeros((len(group), width), dtype=np.float32)
        for r, (inp, lab) in enumerate(group):
            x[r, :len(inp)] = inp
            y[r, :len(lab)] = lab
            mask[r, :len(lab)] = 1.0
        yield x, y, mask


def metrics_from_sums(loss_sum: float, correct: float, events: int) -> dict:
    loss = loss_sum / max(events, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / max(events, 1),
            "events": int(events)}


def evaluate_model(model, sequences: list[np.ndarray], rows: int = EVAL_ROWS) -> dict:
    """Mean next-event cross-entropy (nats), its perplexity, and top-1 accuracy over all real positions."""
    if not sequences:
        raise ChiptuneError("nothing to evaluate: the split has no sequences")
    spec = [tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None, None], tf.float32)]

    @tf.function(input_signature=spec)
    def sums(x, y, mask):
        logits = model(x, training=False)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        hit = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y), tf.float32)
        return tf.reduce_sum(ce * mask), tf.reduce_sum(hit * mask)

    loss_sum = correct = 0.0
    events = 0
    for x, y, mask in padded_batches(sequences, rows):
        a, b = sums(x, y, mask)
        loss_sum += float(a)
        correct += float(b)
        events += int(mask.sum())
    return metrics_from_sums(loss_sum, correct, events)


def model_from_export(model_dir: str | Path):
    """A Keras network holding an exported model's weights, and its hparams."""
    from ..lstm import LstmModel, read_export

    folder = Path(model_dir)
    description, arrays = read_export(folder)
    hparams = LstmModel(arrays, description, folder).hparams  # the shapes checked as generation checks them
    model = build_model(hparams)
    try:
        for i in range(len(hparams.rnn_layer_sizes)):
            model.get_layer(f"lstm{i}").set_weights([arrays["embedding"]] * (i == 0) + [
                arrays[f"lstm{i}_kernel"], arrays[f"lstm{i}_recurrent"], arrays[f"lstm{i}_bias"]])
        model.get_layer("dense").set_weights([arrays["dense_kernel"], arrays["dense_bias"]])
    except ValueError as exc:
        raise ChiptuneError(f"{folder}: the weights do not fit the network model.json describes ({exc})") from None
    return model, hparams


def evaluate_dir(dataset_dir: str | Path, split: str = "eval", run_dir: str | Path | None = None,
                 model: str | None = None) -> dict:
    """Evaluate a run's latest weights or an exported model (`default` or a folder) on a dataset split."""
    from ..lstm import resolve_model_dir
    from .train import load_run_model

    if run_dir is not None:
        net, _, step = load_run_model(Path(run_dir))
        source = {"run_dir": str(run_dir), "training_steps": step}
    else:
        model_dir = resolve_model_dir(model or "default")
        net, _ = model_from_export(model_dir)
        steps = json.loads((model_dir / "model.json").read_text(encoding="utf-8")).get("training_steps", 0)
        source = {"model": str(model_dir), "training_steps": steps}
    sequences = load_split(dataset_dir, split)
    if not sequences:
        raise ChiptuneError(f"{dataset_dir}: the {split} split has no sequences (see its summary.json); "
                            f"evaluate another split or rebuild the dataset")
    result = evaluate_model(net, sequences)
    return {**result, "split": split, "dataset": str(dataset_dir), **source}
