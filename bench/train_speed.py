"""Training throughput of chiptune-forge's trainer against a plain Keras baseline, measured in one run.

Baseline (as in ../shared/docs/anchors.md): one-hot input (259 wide), three keras.layers.LSTM(128,
return_sequences=True), Dense(259), Adam with clipnorm 5, batches of 64 x 512 events, compiled the way Keras
compiles by default. Ours: the trainer's own step with batch_size=64, rnn_layer_sizes=[128,128,128] on
rows of at most 512 events (chunks of the sequences, short ones packed into shared rows, each from a fresh
state) bucketed by length, with the matrix-product precision `train` picks on this
machine (bfloat16 on CPUs with AMX; --matmul-precision to choose) and the default dropout_keep_prob of 0.5
(--dropout-keep-prob 1 trains the same network as the baseline, which has no dropout). Both train on the same
real sequences (from ../shared/corpus/vgmidi when present, else synthetic ones), one step of each in turn so
that both see the same load from whatever else runs on the machine. Steps that compile a new batch shape are
left out of the rates. Both models are then scored on the same held-out sequences the same way (windows of at
most 512 events from a fresh state), after the same number of steps. Both run in one process, so both use
the CPU allocator chiptune-forge sets (TensorFlow's BFC allocator); the baseline's step takes the same time
with malloc.

Where our recurrent loops and output layer are native (`train --loops`, the default where a C++ compiler is
found), our trainer also runs a third time with TensorFlow's, so that the run also prints what the native
kernels gain (--no-tf-loops leaves it out).

Run: .venv/bin/python bench/train_speed.py [--steps N] [--corpus DIR] [--files N] [--matmul-precision P]
                                          [--loops L] [--no-tf-loops] [--dropout-keep-prob K]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from chiptune_forge.dataset import find_midi_files, process_file
from chiptune_forge.encoding import encode
from chiptune_forge.hparams import HParams

BATCH, WINDOW, UNITS = 64, 512, 128
CLASSES = 259


def corpus_sequences(corpus: Path, limit: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Windows of real pieces, encoded; every tenth file goes to the held-out set."""
    train, held_out = [], []
    for k, path in enumerate(find_midi_files(corpus, recursive=False)[:limit]):
        result = process_file(path, path.name, 80, 512)
        seqs = [encode(w, start=True, end=f) for w, f in zip(result.windows, result.finished, strict=True)]
        (held_out if k % 10 == 0 else train).extend(seqs)
    return train, held_out


def synthetic_sequences(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    seqs = [rng.integers(0, CLASSES, size=int(n)).astype(np.int16) for n in rng.integers(300, 3000, size=400)]
    return seqs[:360], seqs[360:]


def windows(sequences: list[np.ndarray]) -> np.ndarray:
    """Non-overlapping windows of WINDOW + 1 events: the baseline's fixed 64 x 512 batches."""
    out = [s[a:a + WINDOW + 1] for s in sequences for a in range(0, len(s) - WINDOW, WINDOW)]
    return np.stack(out).astype(np.int32)


def baseline_model():
    from chiptune_forge.model.framework import keras

    model = keras.Sequential([keras.Input((WINDOW, CLASSES))]
                             + [keras.layers.LSTM(UNITS, return_sequences=True) for _ in range(3)]
                             + [keras.layers.Dense(CLASSES)])
    model.compile(keras.optimizers.Adam(clipnorm=5.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def held_out_loss(predict, sequences: list[np.ndarray]) -> float:
    """Mean masked next-event cross-entropy over windows of at most WINDOW events."""
    from chiptune_forge.model.evaluate import padded_batches

    total = count = 0.0
    for x, y, mask in padded_batches(sequences, BATCH, max_length=WINDOW, pad_multiple=WINDOW):
        logits = np.asarray(predict(x), dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        ce = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        total += float((ce * mask).sum())
        count += float(mask.sum())
    return total / count


def rate(times: list[float], events: list[int], fresh: list[bool]) -> tuple[float, float]:
    """(events/s, s/step) over the steps that did not compile."""
    keep = [i for i, f in enumerate(fresh) if not f]
    t = sum(times[i] for i in keep)
    return sum(events[i] for i in keep) / t, t / len(keep)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps of each model (default 40)")
    parser.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parents[2] / "shared/corpus/vgmidi")
    parser.add_argument("--files", type=int, default=100, help="corpus files to read (default 100)")
    parser.add_argument("--matmul-precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="our trainer's large matrix products, as `train --matmul-precision` (default auto)")
    parser.add_argument("--loops", choices=("auto", "native", "tensorflow"), default="auto",
                        help="our trainer's recurrent loops, as `train --loops` (default auto)")
    parser.add_argument("--no-tf-loops", action="store_true",
                        help="leave out the second run of our trainer with TensorFlow's loops (when ours are native)")
    parser.add_argument("--dropout-keep-prob", type=float, default=HParams.dropout_keep_prob,
                        help="our trainer's dropout_keep_prob (default %(default)s; the baseline has no dropout)")
    args = parser.parse_args()
    if not 0 < args.dropout_keep_prob <= 1:
        parser.error(f"--dropout-keep-prob must be in (0, 1], got {args.dropout_keep_prob:g}")

    rng = np.random.default_rng(0)
    if args.corpus.is_dir():
        train_seqs, held_out = corpus_sequences(args.corpus, args.files)
        source = f"{args.corpus} ({args.files} files)"
    else:
        train_seqs, held_out = synthetic_sequences(rng)
        source = "synthetic sequences (corpus not found)"
    lengths = np.array([len(s) for s in train_seqs])
    print(f"data: {source}: {len(train_seqs)} training sequences (mean {lengths.mean():.0f} events, "
          f"max {lengths.max()}), {len(held_out)} held out")

    from chiptune_forge.model.framework import keras
    from chiptune_forge.model.network import LOOP_GROUPS, build_model
    from chiptune_forge.model.train import (
        BatchSchedule,
        make_chunks,
        make_optimizer,
        make_train_step,
        resolve_loops,
        resolve_matmul_precision,
    )

    hparams = HParams(batch_size=BATCH, rnn_layer_sizes=(UNITS,) * 3, dropout_keep_prob=args.dropout_keep_prob)
    precision = resolve_matmul_precision(args.matmul_precision)
    loops, note = resolve_loops(args.loops, hparams)
    if note:
        print(note)

    def contestant(loops: str) -> tuple:
        keras.utils.set_random_seed(0)  # the same initial weights for every contestant
        model = build_model(hparams, precision, loops)
        optimizer = make_optimizer(hparams)
        optimizer.build(model.trainable_variables)
        return model, make_train_step(model, optimizer), set()

    contestants = {"ours": contestant(loops)}
    if loops == "native" and not args.no_tf_loops:  # what the native loops gain, measured in the same run
        contestants["ours, TF loops"] = contestant("tensorflow")
    schedule = BatchSchedule(make_chunks(train_seqs, WINDOW), BATCH, seed=0)

    base = baseline_model()
    base_windows = windows(train_seqs)
    eye = np.eye(CLASSES, dtype=np.float32)

    names = [*contestants, "baseline"]
    stats = {name: ([], [], []) for name in names}
    losses = {name: [] for name in names}
    for step in range(args.steps):
        x, y, mask, keep = schedule.batch(step)
        for name, (_, train_step, seen) in contestants.items():
            start = time.perf_counter()
            loss, _ = train_step(x, y, mask, keep)
            losses[name].append(float(loss))
            times, events, fresh = stats[name]
            times.append(time.perf_counter() - start)
            events.append(int(mask.sum()))
            fresh.append(x.shape not in seen)
            seen.add(x.shape)
        rows = base_windows[rng.choice(len(base_windows), BATCH, replace=False)]
        start = time.perf_counter()
        losses["baseline"].append(float(base.train_on_batch(eye[rows[:, :-1]], rows[:, 1:])))
        times, events, fresh = stats["baseline"]
        times.append(time.perf_counter() - start)
        events.append(BATCH * WINDOW)
        fresh.append(step == 0)
        if step % 10 == 9:
            print(f"  step {step + 1}: mean training loss of the last 10 steps: "
                  + ", ".join(f"{n} {np.mean(losses[n][-10:]):.3f}" for n in names), flush=True)

    base_rate, base_step_s = rate(*stats["baseline"])
    base_loss = held_out_loss(lambda x: base(eye[x], training=False), held_out)
    where = "native" if loops == "native" else f"TensorFlow's, in {LOOP_GROUPS} parallel row groups"
    print(f"machine: {os.cpu_count()} CPUs; ours: recurrent loops {where}, large matrix products in {precision}, "
          f"dropout_keep_prob={hparams.dropout_keep_prob:g}")
    print(f"baseline (Keras LSTM, one-hot, 64 x 512): {base_rate:8.0f} events/s  {base_step_s:.3f} s/step  "
          f"held-out loss after {args.steps} steps {base_loss:.4f}")
    for name, (model, _, _) in contestants.items():
        ev_rate, step_s = rate(*stats[name])
        loss = held_out_loss(lambda x, m=model: m(x, training=False), held_out)
        print(f"{name:<14} (64 rows of <= 512, packed): {ev_rate:8.0f} events/s  {step_s:.3f} s/step  "
              f"held-out loss after {args.steps} steps {loss:.4f}  ->  {ev_rate / base_rate:.2f}x the baseline's "
              f"events/s, loss {'<=' if loss <= base_loss else '>'} baseline's")
    if len(contestants) > 1:
        print(f"native kernels: {rate(*stats['ours'])[0] / rate(*stats['ours, TF loops'])[0]:.2f}x the events/s of "
              "the same trainer with TensorFlow's loops and output layer")
    print(f"(ours: mean {np.mean(stats['ours'][1]):.0f} real events per step; target >= 3x events/s and "
          "held-out loss <= baseline's; perplexity = exp(loss))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
