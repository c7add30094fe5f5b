"""Trained weights -> a framework-free model folder (model.json + weights.npz), and back.

Generation runs on numpy alone, so everything it needs is written here as plain float32 arrays in
Keras's LSTM layout (gate order i, f, c, o) plus a JSON description; reading it back needs no TensorFlow.
The model card of a shipped model is rendered from the same JSON, so its numbers are the run's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..encoding import ENCODING_VERSION, NUM_CLASSES
from ..hparams import HParams
from ..staging import StagedFiles

FORMAT = "chiptune-forge-lstm-1"

MATH = ("x_t = embedding[event_t]; per LSTM layer: z = x_t @ kernel + h_{t-1} @ recurrent + bias; "
        "i, f, g, o = split(z, 4); i, f, o = sigmoid(i, f, o); g = tanh(g); c_t = f * c_{t-1} + i * g; "
        "h_t = o * tanh(c_t); h_t is the next layer's x_t; logits = h_last @ dense_kernel + dense_bias; "
        "state starts at zero; dropout only in training")


def weight_arrays(model) -> dict[str, np.ndarray]:
    """The named float32 arrays of a network built by `network.build_model`."""
    arrays = {"embedding": np.asarray(model.get_layer("lstm0").embeddings)}
    i = 0
    while any(layer.name == f"lstm{i}" for layer in model.layers):
        layer = model.get_layer(f"lstm{i}")
        arrays[f"lstm{i}_kernel"] = np.asarray(layer.kernel)
        arrays[f"lstm{i}_recurrent"] = np.asarray(layer.recurrent_kernel)
        arrays[f"lstm{i}_bias"] = np.asarray(layer.bias)
        i += 1
    dense = model.get_layer("dense")
    arrays["dense_kernel"] = np.asarray(dense.kernel)
    arrays["dense_bias"] = np.asarray(dense.bias)
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def write_export(arrays: dict[str, np.ndarray], hparams: HParams, out_dir: str | Path, info: dict) -> Path:
    """Write model.json and weights.npz, renamed into place together."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    description = {
        "format": FORMAT,
        "encoding": ENCODING_VERSION,
        "num_classes": NUM_CLASSES,
        "hparams": hparams.to_dict(),
        "layers": list(hparams.rnn_layer_sizes),
        "embedding_dim": int(arrays["embedding"].shape[1]),
        "training_steps": int(info.get("training_steps", 0)),
        "gate_order": "ifco",
        "math": MATH,
        **{k: v for k, v in info.items() if k != "training_steps"},
    }
    with StagedFiles() as files:  # a reader never sees half a model, nor weights of another model.json
        files.write(out_dir / "weights.npz", lambda tmp: _write_npz(tmp, arrays))
        files.write(out_dir / "model.json",
                    lambda tmp: tmp.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8"))
        files.commit()
    return out_dir


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object: given a name without .npz, numpy would add it
        np.savez(fh, **arrays)


def export_weights(model, hparams: HParams, out_dir: str | Path, info: dict) -> Path:
    """Export a Keras network (from `network.build_model`) to the framework-free folder format."""
    return write_export(weight_arrays(model), hparams, out_dir, info)


def model_card(description: dict, default: bool = False) -> str:
    """The MODEL_CARD.md text for an exported model, from the numbers recorded in its model.json.

    `default` is for the shipped default model, which names the corpus it was trained on, its citation and
    the script that reproduces it; any other model's card describes its own dataset only.
    """
    hp = HParams.from_dict(description["hparams"])
    metrics = description.get("eval") or {}
    data = description.get("dataset") or {}
    hours = description.get("training_time_s", 0.0) / 3600.0
    intro = ("A polyphony LSTM (Magenta polyphony_rnn event encoding, 259 classes) that `chiptune-forge` uses "
             "whenever no model is named (`--model default`)." if default else
             "A polyphony LSTM (Magenta polyphony_rnn event encoding, 259 classes) trained with "
             "`chiptune-forge train`; use it with `--model` and this folder.")
    lines = [
        "# chiptune-forge default model" if default else "# chiptune-forge model",
        "",
        intro,
        "",
        "## Network",
        f"- event embedding {description['embedding_dim']} wide, LSTM layers {list(hp.rnn_layer_sizes)}, "
        f"dense layer to {description['num_classes']} logits; format `{description['format']}`, "
        f"encoding `{description['encoding']}`",
        f"- hparams: `{hp.to_string()}`",
        "",
        "## Training",
        f"- steps: {description['training_steps']}, each a batch of {hp.batch_size} chunks of at most "
        f"{description.get('max_length', '?')} events cut from the training sequences (Adam, masked loss)",
        f"- training time: {hours:.2f} h on {description.get('machine', 'a CPU machine')}"
        + (f", large matrix products in {description['matmul_precision']}" if description.get("matmul_precision")
           else ""),
    ]
    if default:
        lines.append("- reproduce: `scripts/train_default_model.sh`")
    if data:
        source = ("of the VGMIDI corpus (piano arrangements of video-game music)" if default else
                  f"from `{data.get('input_dir') or data.get('path', '?')}`")
        lines += [
            "",
            "## Data",
            f"- {data.get('files_used', '?')} of {data.get('files_read', '?')} MIDI files {source}, split by file "
            f"into train and eval (eval ratio {data.get('eval_ratio', '?')}); training pieces transposed by "
            f"{data.get('transpose', '?')} semitones",
            f"- train: {data.get('train_sequences', '?')} sequences, {data.get('train_events', '?')} events; "
            f"eval: {data.get('eval_sequences', '?')} sequences, {data.get('eval_events', '?')} events",
        ]
        if default:
            lines.append("- source: https://github.com/lucasnfe/vgmidi. Cite: Ferreira, L. N. and Whitehead, J. "
                         "\"Learning to Generate Music with Sentiment.\" Proceedings of ISMIR 2019.")
    if metrics:
        lines += [
            "",
            "## Evaluation (held-out eval split, whole sequences)",
            f"- loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}, "
            f"accuracy {metrics['accuracy']:.4f} over {metrics['events']} events",
        ]
    if description.get("selection"):
        lines += ["", "## How the hparams were chosen", description["selection"]]
    return "\n".join(lines) + "\n"
