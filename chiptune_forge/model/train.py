"""Training: a run folder that resumes, survives Ctrl-C and always holds a usable exported model.

Training examples are chunks of at most `max_length` events cut from the dataset's sequences (each chunk
starts from a fresh state), grouped with chunks of similar length and padded to a multiple of 128, so
batches carry little padding and the compiled step sees only a few shapes. The loss is masked to the real
positions. A new run's initial weights and dropout masks come from its seed, and the order of batches is
a pure function of the seed and the step number; a checkpoint holds the dropout layers' random state, so
a resumed run sees exactly the batches and masks it would have seen had it never stopped, and ends with
the same weights.

Run folder layout:
    hparams.json              hparams, encoding, dataset and chunking of the run
    checkpoints/ckpt-N.npz    weights + optimizer state + dropout random state + step count (newest few kept)
    export/                   the framework-free model (model.json + weights.npz), refreshed at each checkpoint
    train/, eval/             TensorBoard summaries
"""

from __future__ import annotations

import bisect
import contextlib
import importlib.util
import json
import math
import os
import platform
import signal
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import load_split, read_summary
from ..encoding import DEFAULT_EVENT, ENCODING_VERSION
from ..errors import ChiptuneError
from ..hparams import MAX_SEED, HParams, differences
from ..progress import bar
from .network import build_model

BUCKET_MULTIPLE = 128
BUCKET_POOL = 50
KEEP_CHECKPOINTS = 3
RUN_SUBFOLDERS = ("checkpoints", "export", "train", "eval")
CPUINFO = Path("/proc/cpuinfo")


@dataclass
class TrainOptions:
    run_dir: Path
    dataset_dir: Path
    hparams: HParams | None = None
    given: frozenset[str] = frozenset()
    num_training_steps: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = KEEP_CHECKPOINTS
    evaluate: bool = False
    max_length: int | None = None
    seed: int | None = None  # a new run's (0 when not given); a resumed run keeps its own
    log_every: int = 25
    show_progress: bool = True
    matmul_precision: str = "auto"
    loops: str = "auto"


def make_chunks(sequences: list[np.ndarray], max_length: int) -> list[np.ndarray]:
    """Cut each sequence into chunks of at most max_length + 1 events (max_length next-event pairs)."""
    chunks = []
    for seq in sequences:
        n = len(seq) - 1
        chunks.extend(np.asarray(seq[a:a + max_length + 1], dtype=np.int32) for a in range(0, n, max_length))
    return [c for c in chunks if len(c) >= 2]


def pack_rows(lengths: np.ndarray, capacity: int, rows_at_least: int) -> list[list[int]]:
    """Chunks (by their lengths in next-event pairs) packed into rows of at most `capacity`, best fit,
    longest first, so that short chunks share rows instead of leaving them mostly padding; one chunk per row
    where packing would leave fewer than `rows_at_least` rows. Deterministic."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, row) of the rows that are not full, sorted
    for chunk in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = int(lengths[chunk])
        at = bisect.bisect_left(room, (need, -1))
        if at < len(room):
            left, row = room.pop(at)
        else:
            left, row = capacity, len(rows)
            rows.append([])
        rows[row].append(chunk)
        if left > need:
            bisect.insort(room, (left - need, row))
    return rows if len(rows) >= rows_at_least else [[i] for i in range(len(lengths))]


class BatchSchedule:
    """Deterministic batches: step N of a run is always the same batch, resumed or not. Short chunks are
    packed into shared rows (`pack_rows`), each starting from zero state, and the rows are bucketed by
    length, so that little of a batch is padding."""

    def __init__(self, chunks: list[np.ndarray], batch_size: int, seed: int) -> None:
        if len(chunks) < batch_size:
            raise ChiptuneError(f"the training split has {len(chunks)} chunks, fewer than batch_size={batch_size}; "
                                "use a smaller batch_size or a bigger dataset")
        self.chunks = chunks
        lengths = np.array([len(c) - 1 for c in chunks])
        # Rows as long as the batch width the longest chunk needs anyway.
        self.rows = pack_rows(lengths, -(-int(lengths.max()) // BUCKET_MULTIPLE) * BUCKET_MULTIPLE, batch_size)
        self.lengths = np.array([sum(len(chunks[i]) - 1 for i in row) for row in self.rows])
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = len(self.rows) // batch_size
        self._epoch = -1
        self._batches: list[np.ndarray] = []

    def _plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.rows))[: self.per_epoch * self.batch_size]
        pool = self.batch_size * BUCKET_POOL
        batches = []
        for first in range(0, len(order), pool):
            part = order[first:first + pool]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches.extend(part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Event ids, next-event labels, mask (1 at real positions) and keep (0 where a chunk starts, so that
        the LSTM state is reset there; else 1), each [batch_size, width]."""
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._batches, self._epoch = self._plan(epoch), epoch
        rows = self._batches[index]
        longest = int(self.lengths[rows].max())
        width = -(-longest // BUCKET_MULTIPLE) * BUCKET_MULTIPLE
        x = np.full((len(rows), width), DEFAULT_EVENT, dtype=np.int32)
        y = np.full((len(rows), width), DEFAULT_EVENT, dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.float32)
        keep = np.ones((len(rows), width), dtype=np.float32)
        for r, row in enumerate(rows):
            at = 0
            for i in self.rows[row]:
                c = self.chunks[i]
                x[r, at:at + len(c) - 1] = c[:-1]
                y[r, at:at + len(c) - 1] = c[1:]
                mask[r, at:at + len(c) - 1] = 1.0
                keep[r, at] = 0.0
                at += len(c) - 1
        return x, y, mask, keep


# ------------------------------------------------------------------------------------------- run folder


def read_run_config(run_dir: Path) -> dict | None:
    path = run_dir / "hparams.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ChiptuneError(f"{path}: not valid JSON ({exc})") from None
    if config.get("encoding") != ENCODING_VERSION:
        raise ChiptuneError(f"{path}: encoding {config.get('encoding')!r} is not {ENCODING_VERSION!r}")
    return config


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("ckpt-*.npz"))
    return found[-1] if found else None


def make_optimizer(hparams: HParams):
    from .framework import keras

    return keras.optimizers.Adam(learning_rate=hparams.learning_rate, global_clipnorm=hparams.clip_norm)


def _random_states(model) -> list[Any]:
    """The network's random-number states (its dropout layers' seed generators): not weights, so not in
    get_weights, but a resumed run needs them to draw the dropout masks it would have drawn without stopping."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def save_checkpoint(run_dir: Path, model, optimizer, step: int, state: dict, keep: int = KEEP_CHECKPOINTS) -> Path:
    """Weights, optimizer slots, the dropout random state and counters in one .npz, written atomically; all but
    the newest `keep` are pruned."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"model_{i}": w for i, w in enumerate(model.get_weights())}
    arrays |= {f"optimizer_{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)}
    arrays |= {f"random_{i}": np.asarray(v) for i, v in enumerate(_random_states(model))}
    path = folder / f"ckpt-{step:08d}.npz"
    tmp = folder / f"ckpt-{step:08d}.npz.tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, step=np.int64(step), state=np.array(json.dumps(state)), **arrays)
    os.replace(tmp, path)
    for old in sorted(folder.glob("ckpt-*.npz"))[:-keep]:
        old.unlink()
    return path


def restore_checkpoint(path: Path, model, optimizer=None) -> tuple[int, dict]:
    """Load a checkpoint into the model (and optimizer); a damaged or mismatched file is a one-line error."""
    try:
        with np.load(path) as data:
            n_model = sum(1 for k in data.files if k.startswith("model_"))
            model.set_weights([data[f"model_{i}"] for i in range(n_model)])
            if optimizer is not None:
                optimizer.build(model.trainable_variables)
                for i, var in enumerate(optimizer.variables):
                    var.assign(data[f"optimizer_{i}"])
                # Checkpoints written before the random states were kept go on from fresh ones.
                states = _random_states(model)
                if sum(1 for k in data.files if k.startswith("random_")) == len(states):
                    for i, var in enumerate(states):
                        var.assign(data[f"random_{i}"])
            return int(data["step"]), json.loads(str(data["state"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ChiptuneError(f"{path}: damaged checkpoint ({getattr(exc, 'strerror', None) or exc}); move it "
                            "away to use the one before it") from None


def _restore_run(run_dir: Path):
    """A run's config and its network restored from the latest checkpoint, with hparams, step and state."""
    config = read_run_config(run_dir)
    if config is None:
        raise ChiptuneError(f"{run_dir}: not a training run folder (no hparams.json)")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ChiptuneError(f"{run_dir}: the run has no checkpoint yet")
    hparams = HParams.from_dict(config["hparams"])
    model = build_model(hparams)
    step, state = restore_checkpoint(ckpt, model)
    return config, model, hparams, step, state


def load_run_model(run_dir: Path):
    """The network of a run at its latest checkpoint, its hparams and step (for evaluate and export)."""
    _, model, hparams, step, _ = _restore_run(run_dir)
    return model, hparams, step


def hardware_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX): there, training's large matrix
    products run several times faster in bfloat16 than in float32, while elsewhere bfloat16 is emulated and
    slower than float32."""
    try:
        with open(CPUINFO, encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def resolve_matmul_precision(requested: str) -> str:
    """The dtype of training's large matrix products: `requested`, or for "auto" bfloat16 on a CPU with AMX
    (and no GPU in use) and float32 everywhere else."""
    if requested != "auto":
        return requested
    from .framework import tf

    return "bfloat16" if hardware_bfloat16() and not tf.config.list_physical_devices("GPU") else "float32"


def resolve_loops(requested: str, hparams: HParams) -> tuple[str, str | None]:
    """The recurrent loops `--loops` asks for ("native" or "tensorflow"), and for "auto" a note saying why it
    fell back to TensorFlow's, if it did."""
    if requested == "tensorflow":
        return "tensorflow", None
    from .native import UNIT_MULTIPLE, load

    odd = [u for u in hparams.rnn_layer_sizes if u % UNIT_MULTIPLE]
    loops = None if odd else load()
    why = (f"rnn_layer_sizes has {odd[0]}, which is not a multiple of {UNIT_MULTIPLE}" if odd
           else loops if isinstance(loops, str) else None)
    if why is None:
        return "native", None
    if requested == "native":
        raise ChiptuneError(f"--loops native: {why}")
    return "tensorflow", f"note: training uses TensorFlow's recurrent loops, which are slower: {why}"


def export_info(run_dir: Path, config: dict, step: int, state: dict) -> dict:
    """What the exported model.json records about the run (the model card is rendered from it)."""
    info = {"training_steps": step, "training_time_s": round(state.get("train_seconds", 0.0), 1),
            "events_trained": state.get("events", 0), "max_length": config["max_length"],
            "dataset": config.get("dataset_summary", {}),
            "machine": f"{platform.machine()} CPU x{os.cpu_count()}"}
    if state.get("matmul_precision", "float32") != "float32":
        info["matmul_precision"] = state["matmul_precision"]
    if state.get("eval"):
        info["eval"] = state["eval"]
    selection = run_dir / "selection.md"
    if selection.is_file():
        info["selection"] = selection.read_text(encoding="utf-8").strip()
    return info


def export_run(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Export a run's latest checkpoint (default: into RUN/export)."""
    from .export import export_weights

    config, model, hparams, step, state = _restore_run(run_dir)
    return export_weights(model, hparams, out_dir or run_dir / "export", export_info(run_dir, config, step, state))


def _dataset_summary(dataset_dir: Path) -> dict:
    summary = read_summary(dataset_dir)
    splits, opts = summary["splits"], summary.get("options") or {}
    return {"path": str(dataset_dir), "input_dir": summary.get("input_dir"),
            "files_read": summary.get("files_read"), "files_used": summary.get("files_used"),
            "eval_ratio": opts.get("eval_ratio"), "transpose": opts.get("transpose"),
            "train_sequences": splits.get("train", {}).get("sequences"),
            "train_events": splits.get("train", {}).get("events"),
            "eval_sequences": splits.get("eval", {}).get("sequences"),
            "eval_events": splits.get("eval", {}).get("events")}


def resolve_config(options: TrainOptions) -> dict:
    """The run's configuration: a new run takes the options, a resumed one must agree with what it has."""
    run_dir = options.run_dir
    if options.seed is not None and not 0 <= options.seed <= MAX_SEED:
        raise ChiptuneError(f"seed must be 0 .. {MAX_SEED}, got {options.seed}")
    existing = read_run_config(run_dir)
    if existing is None or latest_checkpoint(run_dir) is None:  # nothing trained yet: the options decide
        hparams = options.hparams or HParams()
        return {"encoding": ENCODING_VERSION, "hparams": hparams.to_dict(), "max_length": options.max_length or 512,
                "seed": options.seed or 0, "dataset": str(options.dataset_dir.resolve()),
                "dataset_summary": _dataset_summary(options.dataset_dir)}
    run_hparams = HParams.from_dict(existing["hparams"])
    if options.hparams is not None:
        clash = differences(run_hparams, options.hparams, set(options.given))
        if clash:
            raise ChiptuneError(f"{run_dir}: --hparams disagree with the run being resumed ({'; '.join(clash)}); "
                                "use a new --run-dir to train with other hparams")
    if options.max_length is not None and options.max_length != existing["max_length"]:
        raise ChiptuneError(f"{run_dir}: --max-length {options.max_length} disagrees with the run's "
                            f"{existing['max_length']}")
    if options.seed is not None and options.seed != existing["seed"]:
        raise ChiptuneError(f"{run_dir}: --seed {options.seed} disagrees with the run's {existing['seed']}; "
                            "use a new --run-dir to train from another seed")
    return existing


# ------------------------------------------------------------------------------------------------ train


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: writing a checkpoint, then stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_train_step(model, optimizer):
    """One step: masked mean cross-entropy, gradients clipped by global norm, one Adam update.

    The step is a graph but not one XLA program: the network's recurrent loops are compiled on their own
    so that independent groups of rows run on different cores at once.
    """
    from .framework import tf
    from .network import training_loss

    loss_of = training_loss(model)

    @tf.function(reduce_retracing=True)
    def train_step(x, y, mask, keep):
        with tf.GradientTape() as tape:
            loss, accuracy = loss_of(x, y, mask, keep)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss, accuracy

    return train_step


def train(options: TrainOptions) -> dict:
    """Train (or resume) until num_training_steps (0: until stopped); returns the final counters."""
    from .evaluate import evaluate_model
    from .export import export_weights
    from .framework import keras, tf

    run_dir = options.run_dir
    config = resolve_config(options)
    hparams = HParams.from_dict(config["hparams"])
    max_length = int(config["max_length"])
    dataset = options.dataset_dir
    if config.get("dataset") is not None and Path(config["dataset"]).resolve() != dataset.resolve():
        # Going on with other data is allowed (fine-tuning); the run then records the data it trains on now.
        print(f"note: {run_dir} was trained on {config['dataset']} so far; it goes on with {dataset}",
              file=sys.stderr)
        config = {**config, "dataset": str(dataset.resolve()), "dataset_summary": _dataset_summary(dataset)}

    # Everything that can refuse the run is checked before the run folder is written, so that a refused
    # start leaves no folder behind that a corrected command would then be held to.
    chunks = make_chunks(load_split(dataset, "train"), max_length)
    if not chunks:
        raise ChiptuneError(f"{dataset}: the training split has no sequences; rebuild the dataset with more MIDI "
                            "files or a lower --eval-ratio")
    try:
        schedule = BatchSchedule(chunks, hparams.batch_size, int(config["seed"]))
    except ChiptuneError as exc:
        raise ChiptuneError(f"{dataset}: {exc}") from None
    eval_sequences = load_split(dataset, "eval") if options.evaluate else []
    if options.evaluate and not eval_sequences:
        raise ChiptuneError(f"{dataset}: the eval split is empty; train without --eval")
    for name in RUN_SUBFOLDERS:
        if (run_dir / name).exists() and not (run_dir / name).is_dir():
            raise ChiptuneError(f"{run_dir / name}: is a file where the run keeps a folder; move it away")
    precision = resolve_matmul_precision(options.matmul_precision)
    loops, loops_note = resolve_loops(options.loops, hparams)
    if loops_note and options.show_progress:
        print(loops_note, file=sys.stderr)
    # A new run's initial weights and dropout masks come from its seed, as its batch order does; a resumed
    # run takes both from its checkpoint. (This seeds Python's, numpy's and TensorFlow's global generators,
    # which is what Keras's initializers draw from.)
    keras.utils.set_random_seed(int(config["seed"]))
    try:
        model = build_model(hparams, precision, loops)
        optimizer = make_optimizer(hparams)
    except tf.errors.ResourceExhaustedError:
        raise ChiptuneError(f"rnn_layer_sizes={list(hparams.rnn_layer_sizes)} does not fit in memory; use smaller "
                            "layers") from None
    config_path = run_dir / "hparams.json"
    tmp = run_dir / "hparams.json.partial"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, config_path)
    except OSError as exc:
        if tmp.is_file():
            tmp.unlink()
        raise ChiptuneError(f"{config_path}: cannot write ({exc.strerror or exc})") from None

    state: dict = {"train_seconds": 0.0, "events": 0}
    step = 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        step, state = restore_checkpoint(ckpt, model, optimizer)
        if not options.evaluate:
            state.pop("eval", None)  # it described older weights
        if options.show_progress:
            print(f"resuming {run_dir} from step {step}", file=sys.stderr)
    else:
        optimizer.build(model.trainable_variables)
    # What the whole run used: checkpoints from before the choice existed were trained in float32.
    used = state.get("matmul_precision", "float32" if step else precision)
    state["matmul_precision"] = precision if used == precision else "float32 and bfloat16"
    used = state.get("loops", "tensorflow" if step else loops)  # older checkpoints: TensorFlow's
    if used in ("native", "tensorflow") and used != loops and options.show_progress:
        print(f"note: {run_dir} was trained with {used} recurrent loops so far and goes on with {loops} ones; "
              "the weights differ slightly from a run that never switched", file=sys.stderr)
    state["loops"] = loops if used == loops else "native and tensorflow"
    target = options.num_training_steps
    if target and step >= target:
        if options.show_progress:
            print(f"{run_dir} is already at step {step} (--num-training-steps {target}); nothing to do",
                  file=sys.stderr)
        return {"step": step, "nothing_to_do": True, **state}

    train_step = make_train_step(model, optimizer)
    summaries = importlib.util.find_spec("tensorboard") is not None
    if not summaries:
        print("tensorboard is not installed: training without TensorBoard summaries", file=sys.stderr)
    writers = {name: tf.summary.create_file_writer(str(run_dir / name)) for name in ("train", "eval")}

    def log_scalars(name: str, values: dict) -> None:
        if summaries:
            with writers[name].as_default(step=step):
                for key, value in values.items():
                    tf.summary.scalar(key, value)

    def checkpoint() -> None:
        if options.evaluate:
            state["eval"] = evaluate_model(model, eval_sequences)
            log_scalars("eval", {k: state["eval"][k] for k in ("loss", "perplexity", "accuracy")})
        save_checkpoint(run_dir, model, optimizer, step, state, options.keep_checkpoints)
        export_weights(model, hparams, run_dir / "export", export_info(run_dir, config, step, state))

    if options.show_progress and precision != "float32":
        print(f"large matrix products in {precision} (--matmul-precision float32 to keep float32)", file=sys.stderr)
    progress = bar(target or None, desc="train", unit="step", initial=step, disable=not options.show_progress)
    window_loss = window_acc = 0.0
    window_steps = window_events = 0
    window_start = time.perf_counter()
    last_saved = step
    with _StopRequest() as stop, contextlib.ExitStack() as closing:
        for writer in writers.values():  # the summaries since their last flush, however the run ends
            closing.callback(writer.close)
        while not stop.requested and (not target or step < target):
            x, y, mask, keep = schedule.batch(step)
            t0 = time.perf_counter()
            loss, acc = train_step(x, y, mask, keep)
            loss, acc = float(loss), float(acc)
            state["train_seconds"] += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise ChiptuneError(f"the loss became {loss} at step {step + 1}; try a lower learning_rate "
                                    "or clip_norm in --hparams")
            events = int(mask.sum())
            step += 1
            state["events"] += events
            window_loss += loss
            window_acc += acc
            window_steps += 1
            window_events += events
            progress.update(1)
            if window_steps == options.log_every or (target and step == target):
                elapsed = time.perf_counter() - window_start
                mean_loss, mean_acc = window_loss / window_steps, window_acc / window_steps
                rate, ev_rate = window_steps / elapsed, window_events / elapsed
                log_scalars("train", {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 700.0)),
                                      "accuracy": mean_acc, "steps_per_sec": rate, "events_per_sec": ev_rate})
                progress.set_postfix(loss=f"{mean_loss:.3f}", steps_s=f"{rate:.2f}", refresh=False)
                if progress.disable and options.show_progress:
                    print(f"step {step}: loss {mean_loss:.4f}, accuracy {mean_acc:.4f}, {rate:.3f} steps/s, "
                          f"{ev_rate:.0f} events/s", file=sys.stderr, flush=True)
                window_loss = window_acc = 0.0
                window_steps = window_events = 0
                window_start = time.perf_counter()
            if step % options.checkpoint_every == 0:
                checkpoint()
                last_saved = step
        progress.close()
        if step != last_saved or latest_checkpoint(run_dir) is None or (options.evaluate and "eval" not in state):
            checkpoint()
    if stop.requested:
        print(f"stopped at step {step}; checkpoint and export written to {run_dir}", file=sys.stderr)
    return {"step": step, "stopped": stop.requested, **state}
