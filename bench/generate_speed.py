"""Generation speed: whole `chiptune-forge generate` processes, the in-process API, and a naive Keras loop.

Baseline (../shared/docs/anchors.md, same machine kind): Magenta's polyphony_rnn_generate takes 27.6 s for
10 outputs x 128 steps (--primer_melody="[60]"); the target is 50x faster for the whole process (< 0.55 s).
For comparison in the same run, a naive loop calls the Keras network once per event per output on the
whole prefix (no carried state), the way a straightforward port would.

Run: .venv/bin/python bench/generate_speed.py [MODEL_DIR]   (default: the shipped default model; without one, a
random-weight stand-in of the default shape, whose speed per event is the same but whose pieces are not music)
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from chiptune_forge.generate import GenerationRequest, generate
from chiptune_forge.lstm import DEFAULT_MODEL_DIR, load_model

MAGENTA_SECONDS = 27.6
TARGET_SECONDS = MAGENTA_SECONDS / 50
JOBS = [(10, 128), (64, 512)]
REPEATS = 3
NAIVE_EVENTS = 50


def stand_in_model(folder: Path, layers: tuple[int, ...] = (128, 128, 128)) -> Path:
    """Random weights in the export format (a STEP_END bias gives about 4 events a step, like real pieces)."""
    rng = np.random.default_rng(0)
    arrays = {"embedding": rng.normal(0, 1, (259, layers[0])).astype(np.float32)}
    width = layers[0]
    for i, units in enumerate(layers):
        arrays[f"lstm{i}_kernel"] = rng.normal(0, 1 / np.sqrt(width), (width, 4 * units)).astype(np.float32)
        arrays[f"lstm{i}_recurrent"] = rng.normal(0, 1 / np.sqrt(units), (units, 4 * units)).astype(np.float32)
        arrays[f"lstm{i}_bias"] = np.zeros(4 * units, dtype=np.float32)
        width = units
    arrays["dense_kernel"] = rng.normal(0, 0.3, (width, 259)).astype(np.float32)
    arrays["dense_bias"] = np.zeros(259, dtype=np.float32)
    arrays["dense_bias"][2] = 4.0
    np.savez(folder / "weights.npz", **arrays)
    hparams = {"batch_size": 64, "rnn_layer_sizes": list(layers), "dropout_keep_prob": 0.5, "clip_norm": 5.0,
               "learning_rate": 0.001}
    (folder / "model.json").write_text(json.dumps({
        "format": "chiptune-forge-lstm-1", "encoding": "polyphony-1", "num_classes": 259, "hparams": hparams,
        "layers": list(layers), "embedding_dim": layers[0], "training_steps": 0}), encoding="utf-8")
    return folder


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("chiptune-forge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "chiptune_forge"]


def whole_process(model_dir: Path, outputs: int, steps: int, tmp: Path) -> tuple[float, float, int]:
    """Median wall time and CPU time (user + system) of REPEATS `generate` processes, and their events.

    CPU time is what the process itself used: on a busy machine it shows what the wall time would be on an
    idle one.
    """
    walls, cpus = [], []
    for run in range(REPEATS):
        out = tmp / f"cli-{outputs}x{steps}-{run}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([*cli_command(), "generate", "--model", str(model_dir), "--output-dir", str(out),
                        f"--num-outputs={outputs}", f"--num-steps={steps}", "--primer-melody=[60]"],
                       check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    result = json.loads((tmp / f"cli-{outputs}x{steps}-0" / "generate.json").read_text(encoding="utf-8"))
    return statistics.median(walls), statistics.median(cpus), sum(o["num_events"] for o in result["outputs"])


def in_process(model_dir: Path, outputs: int, steps: int) -> tuple[float, int]:
    """Median wall time of REPEATS load_model + generate calls, and the events generated."""
    times, events = [], 0
    for _ in range(REPEATS):
        start = time.perf_counter()
        pieces = generate(load_model(model_dir), GenerationRequest(num_outputs=outputs, num_steps=steps,
                                                                   primer_melody=[60]))
        times.append(time.perf_counter() - start)
        events = sum(len(p.events) for p in pieces)
    return statistics.median(times), events


def naive_keras(model_dir: Path) -> float:
    """Events per second of one output sampled by calling the Keras network once per event on the whole prefix.

    The prefix is padded to a fixed length so the network is traced once (a growing input shape would retrace
    it at every call, which is slower still).
    """
    from chiptune_forge.model.evaluate import model_from_export

    net, _ = model_from_export(model_dir)
    rng = np.random.default_rng(0)
    window = np.full((1, NAIVE_EVENTS + 1), 2, dtype=np.int32)
    window[0, 0] = 0
    net(window, training=False)  # trace outside the timing
    start = time.perf_counter()
    for t in range(NAIVE_EVENTS):
        logits = np.asarray(net(window, training=False))[0, t].astype(np.float64)
        p = np.exp(logits - logits.max())
        window[0, t + 1] = rng.choice(len(p), p=p / p.sum())
    return NAIVE_EVENTS / (time.perf_counter() - start)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if len(sys.argv) > 1:
            model_dir = Path(sys.argv[1])
        elif (DEFAULT_MODEL_DIR / "model.json").is_file():
            model_dir = DEFAULT_MODEL_DIR
        else:
            model_dir = stand_in_model(Path(tempfile.mkdtemp(dir=tmp)))
            print("the default model is not installed: timing a random-weight stand-in of the default shape")
        model = load_model(model_dir)
        print(f"model: {model_dir} (layers {list(model.layer_sizes)})")
        rates = {}
        for outputs, steps in JOBS:
            wall, cpu, events = whole_process(model_dir, outputs, steps, tmp)
            print(f"{outputs} x {steps}, whole process: {wall:.3f} s wall ({cpu:.3f} s CPU), {events} events, "
                  f"{events / wall:,.0f} events/s")
            if (outputs, steps) == JOBS[0]:
                print(f"  vs Magenta's {MAGENTA_SECONDS} s: {MAGENTA_SECONDS / wall:.0f}x faster by wall time, "
                      f"{MAGENTA_SECONDS / cpu:.0f}x by CPU time (target >= 50x, i.e. < {TARGET_SECONDS:.2f} s)")
            wall, events = in_process(model_dir, outputs, steps)
            rates[(outputs, steps)] = events / wall
            print(f"{outputs} x {steps}, in-process (load + generate): {wall:.3f} s, {events} events, "
                  f"{events / wall:,.0f} events/s")
        naive = naive_keras(model_dir)
        print(f"naive Keras loop (one network call per event on the whole prefix, {NAIVE_EVENTS} events of one "
              f"output): {naive:,.1f} events/s")
        for (outputs, steps), rate in rates.items():
            print(f"  in-process {outputs} x {steps} is {rate / naive:,.0f}x the naive loop's events/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
