"""Command-line parsing only: each subcommand parses its flags and calls one function.

Flags accept Magenta's spellings as aliases (`--eval_ratio` beside `--eval-ratio`), and booleans take
`--flag`, `--no-flag` and `--flag=true|false`, so classic polyphony_rnn command lines keep working.
Heavy modules are imported inside each command so that `--help` and the cheap commands start fast.
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ChiptuneError, UsageError, print_warning
from .hparams import MAX_SEED

if TYPE_CHECKING:
    from .presets import Preset
    from .render import RenderStats

EXIT_INTERRUPTED = 130  # what a shell reports for a command stopped by Ctrl-C
LOG_LEVELS = ("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL")  # Magenta's --log levels
CHATTY_LOG_LEVELS = ("DEBUG", "INFO")  # the levels at which progress and summaries are printed
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_FLAG_NEGATIVES: dict[str, str] = {}
"""Each boolean flag's spellings -> its --no- form, so `--name=false` can be read as `--no-name`."""


def add_flag(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    """A boolean flag as `--name`, `--name=true|false` and `--no-name` (dash and underscore spellings).

    `--name` takes no value of its own (so `build --check folder` keeps `folder` as the manifest);
    `--name=VALUE` is rewritten before parsing (see _expand_flag_values)."""
    dest = name.replace("-", "_")
    spellings = [f"--{name}"] + ([f"--{dest}"] if dest != name else [])
    negatives = [f"--no-{name}"] + ([f"--no_{dest}", f"--no{dest}"] if dest != name else [f"--no{dest}"])
    parser.add_argument(*spellings, dest=dest, action="store_true", default=default,
                        help=f"{help}; also --{name}=true|false, --no-{name} (default: {str(default).lower()})")
    parser.add_argument(*negatives, dest=dest, action="store_false", help=argparse.SUPPRESS)
    _FLAG_NEGATIVES.update(dict.fromkeys(spellings, negatives[0]))


def _expand_flag_values(argv: Sequence[str]) -> list[str]:
    """`--flag=true` -> `--flag`, `--flag=false` -> `--no-flag` (Magenta's boolean spellings)."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if eq and name in _FLAG_NEGATIVES:
            try:
                arg = name if parse_bool(value) else _FLAG_NEGATIVES[name]
            except argparse.ArgumentTypeError:
                raise ChiptuneError(f"{name}: expected true or false, got {value!r}") from None
        out.append(arg)
    return out


def option(name: str) -> list[str]:
    """`--some-name` plus its Magenta spelling `--some_name`."""
    snake = name.replace("-", "_")
    return [f"--{name}", f"--{snake}"] if snake != name else [f"--{name}"]


def parse_int_range(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.replace(":", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers like -4,4, got {text!r}") from None
    if len(parts) == 1:
        return (-abs(parts[0]), abs(parts[0]))
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two integers like -4,4, got {text!r}")
    return (parts[0], parts[1])


def parse_seed(text: str) -> int:
    """A seed for numpy's and TensorFlow's generators, which take 0 .. MAX_SEED."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be 0 .. {MAX_SEED}, got {value}")
    return value


# ----------------------------------------------------------------------------------------- subcommands


def _add_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="turn a folder of MIDI files into a training dataset",
                       description="Read every MIDI file in a folder, split and quantize it, cut long pieces into "
                                   "bar-aligned windows, and write train/eval event sequences plus summary.json.")
    p.add_argument(*option("input-dir"), "--input", dest="input_dir", required=True, help="folder of MIDI files")
    p.add_argument(*option("output-dir"), dest="output_dir", required=True, help="dataset folder to write")
    p.add_argument(*option("eval-ratio"), dest="eval_ratio", type=float, default=0.10,
                   help="fraction of files held out for evaluation (default 0.10)")
    add_flag(p, "recursive", False, "also read MIDI files in subfolders")
    p.add_argument("--seed", type=parse_seed, default=0, help="seed of the train/eval split (default 0)")
    p.add_argument("--transpose", type=parse_int_range, default=(-4, 4), metavar="LO,HI",
                   help="transpositions of the training split, in semitones (default -4,4)")
    p.add_argument(*option("min-steps"), dest="min_steps", type=int, default=80,
                   help="drop parts shorter than this many steps (default 80)")
    p.add_argument(*option("max-steps"), dest="max_steps", type=int, default=512,
                   help="cut longer parts into bar-aligned windows of at most this many steps (default 512)")
    p.add_argument(*option("tempo-tolerance"), dest="tempo_tolerance", type=float, default=0.1, metavar="FRACTION",
                   help="split a piece where its tempo moves more than this fraction from the part's opening "
                        "tempo (default 0.1, so a ritardando stays one part; 0 splits at every tempo change)")
    p.set_defaults(func=_run_dataset)


def _run_dataset(args: argparse.Namespace) -> int:
    from .dataset import DatasetOptions, build_dataset

    options = DatasetOptions(eval_ratio=args.eval_ratio, seed=args.seed, transpose=args.transpose,
                             min_steps=args.min_steps, max_steps=args.max_steps, recursive=args.recursive,
                             tempo_tolerance=args.tempo_tolerance)
    summary = build_dataset(args.input_dir, args.output_dir, options)
    steps = summary["note_steps"]
    train, evals = summary["splits"]["train"], summary["splits"]["eval"]
    print(f"{summary['files_used']} of {summary['files_read']} files used "
          f"({len(summary['files_skipped'])} skipped); "
          f"train: {train['sequences']} sequences, {train['events']} events; "
          f"eval: {evals['sequences']} sequences, {evals['events']} events")
    print(f"kept {steps['kept_fraction']:.1%} of the input's note-steps "
          f"(the 80..512-step discard rule would keep {steps['reference_discard_rule_fraction']:.1%}); "
          f"summary: {args.output_dir}/summary.json")
    if not train["sequences"]:
        print("chiptune-forge: warning: the train split is empty, so 'train' cannot use this dataset; give more "
              "MIDI files or a lower --eval-ratio", file=sys.stderr)
    return 0


def _dataset_dir(path: str) -> Path:
    """A dataset folder, or (Magenta style) a file inside one such as a shard given as --sequence_example_file.

    Checked here, before a command imports TensorFlow, so a wrong path is reported at once."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    if not folder.is_dir():
        raise ChiptuneError(f"{path}: no such dataset folder")
    if not (folder / "summary.json").is_file():
        raise ChiptuneError(f"{path}: not a dataset folder (no summary.json); build one with 'chiptune-forge dataset'")
    return folder


def _run_folder(path: str, new_ok: bool) -> Path:
    """A training run folder (or, with `new_ok`, a place for a new one), checked before TensorFlow loads."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ChiptuneError(f"{path}: is a file, not a run folder")
    if not new_ok and not p.is_dir():
        raise ChiptuneError(f"{path}: no such run folder")
    if not new_ok and not (p / "hparams.json").is_file():
        raise ChiptuneError(f"{path}: not a training run folder (no hparams.json)")
    return p


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the polyphony LSTM on a dataset (resumes a run folder)",
                       description="Train the LSTM on a dataset's train split. Running the same command again "
                                   "resumes from the latest checkpoint; Ctrl-C writes a checkpoint and stops.")
    p.add_argument(*option("run-dir"), dest="run_dir", required=True, help="run folder (checkpoints, export, logs)")
    p.add_argument("--dataset", *option("sequence-example-file"), dest="dataset", required=True,
                   help="dataset folder written by 'chiptune-forge dataset' (or a file inside it)")
    p.add_argument("--hparams", default=None,
                   help='Magenta hparams string, e.g. "batch_size=64,rnn_layer_sizes=[128,128,128]"')
    p.add_argument(*option("num-training-steps"), dest="num_training_steps", type=int, default=0,
                   help="stop at this total step count (default 0: train until stopped)")
    p.add_argument(*option("checkpoint-every"), dest="checkpoint_every", type=int, default=100,
                   help="steps between checkpoints and exports (default 100)")
    p.add_argument(*option("num-checkpoints"), dest="num_checkpoints", type=int, default=3,
                   help="how many of the newest checkpoints to keep (default 3)")
    p.add_argument(*option("summary-frequency"), dest="summary_frequency", type=int, default=25,
                   help="steps between TensorBoard summaries and progress lines (default 25)")
    p.add_argument("--log", type=str.upper, default="INFO", choices=LOG_LEVELS,
                   help="INFO or DEBUG show progress; WARN, ERROR or FATAL print only warnings and errors "
                        "(default INFO)")
    p.add_argument(*option("max-length"), dest="max_length", type=int, default=None,
                   help="train on chunks of at most this many events (default 512; fixed for a run)")
    p.add_argument("--seed", type=parse_seed, default=None,
                   help="seed of a new run: its initial weights, dropout masks and batch order (default 0); a "
                        "resumed run keeps its own")
    add_flag(p, "eval", False, "evaluate on the eval split at every checkpoint (recorded in the export)")
    p.add_argument(*option("matmul-precision"), dest="matmul_precision", choices=("auto", "float32", "bfloat16"),
                   default="auto", help="operands of the LSTM layers' large matrix products (input projections, "
                                        "weight gradients); weights, recurrent loops, the output layer and "
                                        "evaluation stay float32. auto: bfloat16 on CPUs with AMX, where it is "
                                        "several times faster, else float32 (default auto)")
    p.add_argument("--loops", choices=("auto", "native", "tensorflow"), default="auto",
                   help="the LSTM layers' recurrent loops (with their input products and dropout) and the output "
                        "layer in training: native code built with the machine's C++ compiler on first use (a "
                        "training step about 1.4x faster), or TensorFlow's. auto: native "
                        "where a compiler is found and every layer size is a multiple of 16, else TensorFlow's, "
                        "with a note saying why (default auto)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .hparams import parse_hparams

    hparams, given = parse_hparams(args.hparams) if args.hparams is not None else (None, set())
    for flag, value in (("--checkpoint-every", args.checkpoint_every), ("--num-checkpoints", args.num_checkpoints),
                        ("--summary-frequency", args.summary_frequency)):
        if value < 1:
            raise ChiptuneError(f"{flag} must be at least 1, got {value}")
    if args.num_training_steps < 0:
        raise ChiptuneError(f"--num-training-steps must be 0 or more, got {args.num_training_steps}")
    if args.max_length is not None and args.max_length < 2:
        raise ChiptuneError(f"--max-length must be at least 2, got {args.max_length}")
    dataset = _dataset_dir(args.dataset)
    run_dir = _run_folder(args.run_dir, new_ok=True)
    from .model.train import TrainOptions, train

    result = train(TrainOptions(run_dir=run_dir, dataset_dir=dataset, hparams=hparams,
                                given=frozenset(given), num_training_steps=args.num_training_steps,
                                checkpoint_every=args.checkpoint_every, keep_checkpoints=args.num_checkpoints,
                                evaluate=args.eval, max_length=args.max_length, seed=args.seed,
                                log_every=args.summary_frequency, show_progress=args.log in CHATTY_LOG_LEVELS,
                                matmul_precision=args.matmul_precision, loops=args.loops))
    if result.get("nothing_to_do"):
        return 0
    line = f"step {result['step']}; exported model: {Path(args.run_dir) / 'export'}"
    if result.get("eval"):
        m = result["eval"]
        line += f"; eval loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f}, accuracy {m['accuracy']:.4f}"
    print(line)
    return EXIT_INTERRUPTED if result.get("stopped") else 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="loss, perplexity and accuracy of a model on a dataset",
                       description="Score a run's latest checkpoint or an exported model on a dataset split.")
    which = p.add_mutually_exclusive_group()
    which.add_argument(*option("run-dir"), dest="run_dir", default=None, help="training run folder")
    which.add_argument("--model", default=None,
                       help="'default' (the shipped model) or an exported model folder (default: default)")
    p.add_argument("--dataset", *option("sequence-example-file"), dest="dataset", required=True,
                   help="dataset folder (or a file inside it)")
    p.add_argument("--split", choices=("eval", "train"), default="eval", help="which split to score (default eval)")
    add_flag(p, "json", False, "print the result as JSON")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import json

    dataset = _dataset_dir(args.dataset)
    run_dir = _run_folder(args.run_dir, new_ok=False) if args.run_dir is not None else None
    from .model.evaluate import evaluate_dir

    result = evaluate_dir(dataset, args.split, run_dir=run_dir, model=args.model)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
              f"accuracy {result['accuracy']:.4f} over {result['events']} events ({result['split']} split)")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's weights as a framework-free model folder",
                       description="Write a run's latest checkpoint as model.json + weights.npz (no TensorFlow "
                                   "needed to use it), into RUN/export or --output-dir.")
    p.add_argument(*option("run-dir"), dest="run_dir", required=True, help="training run folder")
    p.add_argument(*option("output-dir"), dest="output_dir", default=None, help="where to write (default RUN/export)")
    add_flag(p, "model-card", False, "also write MODEL_CARD.md from the run's recorded numbers")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import json

    run_dir = _run_folder(args.run_dir, new_ok=False)
    if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ChiptuneError(f"{args.output_dir}: is a file, not a folder to export into")
    from .model.export import model_card
    from .model.train import export_run

    out = export_run(run_dir, Path(args.output_dir) if args.output_dir else None)
    if args.model_card:
        from .lstm import DEFAULT_MODEL_DIR

        description = json.loads((out / "model.json").read_text(encoding="utf-8"))
        card = model_card(description, default=out.resolve() == DEFAULT_MODEL_DIR.resolve())
        (out / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    print(f"exported {args.run_dir} to {out}")
    return 0


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a game's soundtrack from its manifest (chiptune.toml)",
                       description="Generate, pick, render and export every track of a manifest, redoing only "
                                   "what changed. Exit codes: 0 done or up to date, 1 out of date (--check), "
                                   "2 invalid manifest or usage, 3 a track failed or the build could not run.")
    p.add_argument("manifest", nargs="?", default="chiptune.toml", help="manifest file or its folder")
    p.add_argument("--only", nargs="+", metavar="NAME", help="build only these tracks")
    add_flag(p, "force", False, "render and export again even if nothing changed")
    p.add_argument("--regenerate", nargs="+", metavar="NAME", default=[],
                   help="drop these tracks' locked takes and generate them anew")
    add_flag(p, "check", False, "list what is out of date and exit 1 if anything is")
    add_flag(p, "json", False, "print a machine-readable report on stdout")
    p.set_defaults(func=_run_build, failure_exit=3)


def _run_build(args: argparse.Namespace) -> int:
    import json

    from .builder import build

    try:
        if args.only and args.regenerate and set(args.regenerate) - set(args.only):
            raise UsageError(f"--regenerate {' '.join(sorted(set(args.regenerate) - set(args.only)))}: not among "
                             f"the --only tracks, so nothing would be regenerated; add it to --only")
        try:
            report = build(args.manifest, only=args.only, force=args.force, regenerate=args.regenerate,
                           check=args.check, show_progress=not args.json)
        except UsageError as exc:
            stray = [n for n in (args.only or []) + (args.regenerate or []) if Path(n).exists()]
            if stray and args.manifest == "chiptune.toml" and not Path(args.manifest).exists():
                raise UsageError(f"{exc}; '{stray[0]}' was read as a track name: --only and --regenerate take "
                                 f"every name after them, so give the manifest first (build {stray[0]} --only ...)"
                                 ) from None
            raise
    except (ChiptuneError, OSError) as exc:
        if args.json:  # a script reading the report gets one whatever went wrong
            from .manifest import manifest_file

            errors = getattr(exc, "problems", None) or [_error_text(exc)]
            print(json.dumps({"manifest": str(manifest_file(args.manifest).resolve()), "ok": False, "seconds": 0.0,
                              "tracks": [], "errors": errors}, indent=2))
        if isinstance(exc, UsageError):
            raise  # exit 2, from main
        print(f"chiptune-forge: error: {_error_text(exc)}", file=sys.stderr)  # e.g. another build holds the folder
        return 3
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for t in report.tracks:
            why = f" ({'; '.join(t.reasons)})" if t.reasons else ""
            if t.status == "failed":
                print(f"{t.name}: FAILED: {t.error}", file=sys.stderr)
            elif t.status == "built":
                print(f"{t.name}: built [{', '.join(t.stages) or 'export'}] in {t.seconds:.2f} s{why}")
            elif t.status == "outdated":
                print(f"{t.name}: out of date{why}")
            elif t.status == "removed":
                print(f"{t.name}: removed from the manifest"
                      + (f"; deleted {', '.join(Path(f).name for f in t.files)}" if t.files else ""))
            else:
                print(f"{t.name}: up to date")
    if report.failed:
        return 3
    if args.check and report.changed:
        return 1
    return 0


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a commented starter chiptune.toml",
                       description="Write a starter manifest with every option explained.")
    p.add_argument("path", nargs="?", default="chiptune.toml", help="where to write it (default chiptune.toml)")
    p.set_defaults(func=_run_init)


def _run_init(args: argparse.Namespace) -> int:
    import shlex

    from .manifest import MANIFEST_NAME, STARTER, manifest_file

    if args.path == "-":
        raise ChiptuneError("init: give a project folder or a .toml file name, not '-'")
    path = manifest_file(args.path)
    if not path.is_dir() and path.suffix.lower() != ".toml":  # a folder to create, e.g. "mygame" or "mygame/"
        path = path / MANIFEST_NAME
    if path.exists():
        raise UsageError(f"{path}: already exists; not overwriting it")
    blocking = next((f for f in [path.parent, *path.parent.parents] if f.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ChiptuneError(f"{blocking}: is a file, not a folder; give a new or existing folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(STARTER, encoding="utf-8")
    except OSError as exc:
        raise ChiptuneError(f"{path}: cannot write ({exc.strerror or exc})") from None
    print(f"wrote {path}; build it with: chiptune-forge build {shlex.quote(str(path))}")
    return 0


def _add_watch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="build, then rebuild what each edit affects",
                       description="Build once, then watch the manifest, its presets, MIDI and primer files and "
                                   "the model, rebuilding only the affected tracks after each save.")
    p.add_argument("manifest", nargs="?", default="chiptune.toml", help="manifest file or its folder")
    p.add_argument("--debounce", type=float, default=0.2, metavar="SECONDS",
                   help="quiet time after the last change before rebuilding (default 0.2)")
    p.add_argument("--once-after", type=float, default=None, metavar="SECONDS",
                   help="stop by itself after this many seconds (for scripts and tests)")
    p.set_defaults(func=_run_watch)


def _run_watch(args: argparse.Namespace) -> int:
    from .manifest import manifest_file, not_found
    from .watch import Watcher

    manifest = manifest_file(args.manifest)
    if not manifest.is_file():  # a typo would otherwise watch a folder forever for a file that never comes
        raise UsageError(not_found(manifest))
    return Watcher(args.manifest, debounce=args.debounce, log=lambda m: print(m, flush=True)).run(args.once_after)


def _add_plugins(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="inspect VST3 plugins and capture their state for presets",
                       description="Look at a VST3 plugin the way a preset sees it. A plugin may be a path or a "
                                   "bundle name found on $CHIPTUNE_FORGE_VST3_PATH or the standard VST3 folders.")
    actions = p.add_subparsers(dest="plugins_command", metavar="ACTION", required=True)
    p.set_defaults(actions=actions.choices)  # for errors in the action's own words
    info = actions.add_parser("info", help="name, kind, latency and parameters (with ranges and defaults)",
                              description="Load a plugin and list its parameters under the names presets use.")
    info.add_argument("plugin", help="a .vst3 bundle path or bundle name")
    add_flag(info, "json", False, "print JSON instead of text")
    info.set_defaults(func=_run_plugins_info)
    state = actions.add_parser("state", help="set parameters and save the plugin's state for a preset",
                               description="Load a plugin, apply --set values, and write its state: raw state "
                                           "(a preset's state_file), or .vstpreset data if OUTPUT ends in "
                                           ".vstpreset (a preset's preset_file).")
    state.add_argument("plugin", help="a .vst3 bundle path or bundle name")
    state.add_argument("--set", dest="assignments", action="append", default=[], metavar="NAME=VALUE",
                       help="set a parameter first (repeatable; names as `plugins info` shows them)")
    state.add_argument("-o", "--output", required=True, help="file to write (e.g. lead.bin or lead.vstpreset)")
    state.set_defaults(func=_run_plugins_state)


def _run_plugins_info(args: argparse.Namespace) -> int:
    import json

    from .plugins import format_info, plugin_info

    info = plugin_info(args.plugin)
    print(json.dumps(info.to_dict(), indent=2) if args.json else format_info(info))
    return 0


def _run_plugins_state(args: argparse.Namespace) -> int:
    from .plugins import save_state

    size = save_state(args.plugin, args.assignments, Path(args.output))
    print(f"wrote {args.output} ({size} bytes)")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate pieces with a trained model and write them as MIDI",
                       description="Sample pieces from a trained model (numpy only, all outputs as one batch) and "
                                   "write one MIDI file per output plus generate.json with each output's seed and "
                                   "scores. Magenta's polyphony_rnn_generate flags and spellings are accepted.")
    which = p.add_mutually_exclusive_group()
    which.add_argument(*option("run-dir"), dest="run_dir", default=None, help="training run folder (uses RUN/export)")
    which.add_argument("--model", default=None,
                       help="'default' (the shipped model) or an exported model folder (default: default)")
    p.add_argument("--hparams", default=None, help="Magenta hparams string; checked against the model's own")
    p.add_argument(*option("output-dir"), dest="output_dir", required=True,
                   help="folder for the MIDI files and generate.json")
    p.add_argument(*option("num-outputs"), dest="num_outputs", type=int, default=10,
                   help="how many pieces to generate (default 10)")
    length = p.add_mutually_exclusive_group()
    length.add_argument(*option("num-steps"), dest="num_steps", type=int, default=None,
                        help="total length in sixteenth-note steps, primer included (default 128)")
    length.add_argument("--bars", type=int, default=None, help="total length in 4/4 bars of 16 steps")
    primer = p.add_mutually_exclusive_group()
    primer.add_argument(*option("primer-melody"), dest="primer_melody", default=None, metavar="LIST",
                        help='one entry per step: a pitch starts a note, -2 holds, -1 ends it; e.g. "[60,-2,64]"')
    primer.add_argument(*option("primer-pitches"), dest="primer_pitches", default=None, metavar="LIST",
                        help='a chord held for one quarter note, e.g. "[67,64,60]"')
    primer.add_argument(*option("primer-midi"), dest="primer_midi", default=None, metavar="FILE",
                        help="a MIDI file whose first section primes the model")
    add_flag(p, "condition-on-primer", True, "feed the primer through the model before sampling")
    add_flag(p, "inject-primer-during-generation", False,
             "force the primer's notes into every output at their steps (to harmonize a melody)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits: below 1 is safer, above 1 wilder, 0 always takes the likeliest event")
    p.add_argument(*option("beam-size"), dest="beam_size", type=int, default=1, help="beam search width (default 1)")
    p.add_argument(*option("branch-factor"), dest="branch_factor", type=int, default=1,
                   help="branches per beam and iteration (default 1)")
    p.add_argument(*option("steps-per-iteration"), dest="steps_per_iteration", type=int, default=1,
                   help="events sampled per beam search iteration (default 1)")
    p.add_argument(*option("max-polyphony"), dest="max_polyphony", type=int, default=8,
                   help="most notes sounding in one step (default 8, the SNES voice count)")
    p.add_argument("--qpm", type=float, default=None, help="tempo of the output (default: the primer MIDI's, else 120)")
    p.add_argument("--seed", type=int, default=0,
                   help="output i's random stream is derived from SEED and i, so the same seed gives the same "
                        "pieces whatever --num-outputs is (default 0)")
    p.add_argument("--log", type=str.upper, default="INFO", choices=LOG_LEVELS,
                   help="INFO or DEBUG print what was written; WARN, ERROR or FATAL only warnings and errors "
                        "(default INFO)")
    p.set_defaults(func=_run_generate)


def _single_threaded_blas() -> None:
    """No BLAS thread pool for this process and those it starts; effective only before numpy loads. For
    commands whose matrix products are small (generation: one event per step) or absent (rendering), where
    the pool's threads cost their start-up and hand-offs and gain nothing."""
    import os

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _run_generate(args: argparse.Namespace) -> int:
    import time

    _single_threaded_blas()
    started = time.perf_counter()
    from .generate import GenerationRequest, check_hparams, generate, output_name, parse_int_list, rank, write_outputs
    from .lstm import load_model

    request = GenerationRequest(
        num_outputs=args.num_outputs, num_steps=args.num_steps, bars=args.bars,
        primer_melody=parse_int_list(args.primer_melody, "--primer-melody") if args.primer_melody else None,
        primer_pitches=parse_int_list(args.primer_pitches, "--primer-pitches") if args.primer_pitches else None,
        primer_midi=args.primer_midi, condition_on_primer=args.condition_on_primer,
        inject_primer_during_generation=args.inject_primer_during_generation, temperature=args.temperature,
        beam_size=args.beam_size, branch_factor=args.branch_factor, steps_per_iteration=args.steps_per_iteration,
        max_polyphony=args.max_polyphony, qpm=args.qpm, seed=args.seed)
    request.validate()
    if not (args.primer_melody or args.primer_pitches or args.primer_midi):
        unused = [flag for flag, used in (("--inject-primer-during-generation", args.inject_primer_during_generation),
                                          ("--no-condition-on-primer", not args.condition_on_primer)) if used]
        if unused:
            verb = "does" if len(unused) == 1 else "do"
            print(f"chiptune-forge: warning: {' and '.join(unused)} {verb} nothing without a primer "
                  "(--primer-melody, --primer-pitches or --primer-midi)", file=sys.stderr)
    model = load_model(args.run_dir or args.model)
    if args.hparams is not None:
        check_hparams(model, args.hparams)
    pieces = generate(model, request)
    path = write_outputs(pieces, args.output_dir, request, model)
    best = rank(pieces)[0]
    events = sum(len(p.events) for p in pieces)
    files = "1 MIDI file" if len(pieces) == 1 else f"{len(pieces)} MIDI files"
    if args.log in CHATTY_LOG_LEVELS:
        print(f"wrote {files} and {path} in {time.perf_counter() - started:.2f} s ({events} events); "
              f"best: {output_name(best.index, len(pieces))} (rank score {best.scores['rank_score']:.3f})")
    silent = sum(1 for p in pieces if not len(p.quantized.pitch))
    if silent:
        print(f"chiptune-forge: warning: {silent} of {len(pieces)} outputs have no notes (the model ended or only "
              "closed steps; give a primer or a higher --temperature)", file=sys.stderr)
    return 0


def _add_render(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render a MIDI file to WAV or OGG with the built-in SNES sampler",
                       description="Arrange a MIDI file into parts, play it on the emulated SNES sound chip with a "
                                   "preset's instruments, echo and effects, and write the whole piece with its tail.")
    p.add_argument("input", metavar="IN.mid", help="MIDI file to render")
    p.add_argument("-o", "--output", required=True, metavar="OUT.wav|OUT.ogg",
                   help="output file; .wav writes 16-bit PCM, .ogg writes Ogg Vorbis")
    p.add_argument("--preset", default="snes", metavar="NAME|PATH",
                   help="a shipped preset (see 'chiptune-forge presets') or a preset .toml file (default: snes)")
    p.add_argument(*option("sample-rate"), dest="sample_rate", type=int, default=32000,
                   help="output rate: 32000 (the chip's own), 44100 or 48000 (default 32000)")
    add_flag(p, "loop", False, "write a seamless loop: the intro once, then the body forever "
                               "(OGG LOOPSTART/LOOPLENGTH, WAV smpl); without it a jingle that fades to silence")
    p.add_argument(*option("intro-bars"), dest="intro_bars", type=int, default=0,
                   help="bars of intro from the start of the MIDI before the loop body (default 0)")
    p.add_argument("--bars", type=int, default=None,
                   help="bars in the loop body (default: up to the piece's last bar line); without --loop, "
                        "render only the first BARS bars")
    p.add_argument("--loudness", type=float, default=None, metavar="LUFS",
                   help="normalize to this integrated loudness and write NAME.json (default: -16 with --loop; "
                        "without --loop the chip's own level and no NAME.json, unless this or --true-peak is "
                        "given)")
    p.add_argument(*option("true-peak"), dest="true_peak", type=float, default=None, metavar="DBTP",
                   help="true-peak ceiling when normalizing, checked after encoding (default -1); giving it "
                        "normalizes a render without --loop too")
    add_flag(p, "godot-import", False, "also write Godot 4 .import settings (loop, loop offset)")
    add_flag(p, "split", False, "also write NAME_intro and NAME_loop clips for engines that chain clips")
    p.set_defaults(func=_run_render)


def _run_render(args: argparse.Namespace) -> int:
    import contextlib
    import math

    _single_threaded_blas()
    from .export import (
        TARGET_LUFS,
        TRUE_PEAK_DB,
        export_track,
        file_sha256,
        loudness_problem,
        sidecar_listed,
        true_peak_problem,
        write_jingle_wav,
    )
    from .loops import jingle_piece, render_track
    from .midi import read_midi
    from .presets import load_preset
    from .render import DSP_RATE, RenderStats, check_output_path, check_sample_rate, chip_blocks, render_piece

    output = check_output_path(args.output)
    check_sample_rate(args.sample_rate)
    normalizing = args.loop or args.loudness is not None or args.true_peak is not None
    target = TARGET_LUFS if args.loudness is None else args.loudness
    ceiling = TRUE_PEAK_DB if args.true_peak is None else args.true_peak
    for flag, reason in (("--loudness", loudness_problem(target)), ("--true-peak", true_peak_problem(ceiling))):
        if reason:
            raise ChiptuneError(f"{flag} {reason}")
    if args.split and not args.loop:
        raise ChiptuneError("--split needs --loop: it writes the loop's intro and body as separate clips")
    if args.intro_bars and not args.loop:
        raise ChiptuneError("--intro-bars needs --loop: the intro is what plays once before the loop")
    sidecar = output.with_name(f"{output.stem}.json")
    described = sidecar_listed(output.parent, output.stem)  # before this render's NAME.json replaces it
    if normalizing and sidecar.exists() and not described:
        raise ChiptuneError(f"{sidecar}: exists and is not a sidecar chiptune-forge wrote for {output.name}; "
                            "move it away or render to another name")
    preset = load_preset(args.preset)
    piece = read_midi(args.input)
    if not piece.notes:
        raise ChiptuneError(f"{args.input}: no notes to render")
    for warning in piece.warnings:
        print_warning(f"{args.input}: {warning}")
    stats = RenderStats()
    fmt = output.suffix[1:].lower()
    rate = args.sample_rate
    # A plain WAV of the chip's own output is written as it is mixed: the file the general path writes,
    # without holding the piece.
    streamed = fmt == "wav" and not normalizing and not args.godot_import and not preset.effects and rate == DSP_RATE
    try:
        if streamed:
            jingle, _ = jingle_piece(piece, rate, args.intro_bars, args.bars)
            blocks = chip_blocks(jingle, preset, stats, parallel=True)  # plugin parts render here
        else:
            track = render_track(piece, lambda p, rate: render_piece(p, preset, rate, stats=stats, parallel=True),
                                 rate, loop=args.loop, intro_bars=args.intro_bars, bars=args.bars)
    except ChiptuneError as exc:
        raise ChiptuneError(f"{args.input}: {exc}") from None
    if streamed:
        final = output.with_name(f"{output.stem}.{fmt}")  # named as export_track names it
        with contextlib.closing(blocks):
            frames, peak = write_jingle_wav(final, blocks, round(jingle.end_time * rate), rate)
        paths, loop, level = [final], None, _chip_level(peak)
    else:
        if normalizing:
            from .export import measure_loudness, normalize

            loudness = measure_loudness(track)
            track, gain = normalize(track, target, ceiling, formats=(fmt,), loudness_lufs=loudness)
            info = {"source_midi": Path(args.input).name, "midi_sha256": file_sha256(args.input),
                    "preset": preset.name, "gain_db": round(gain, 3)}
            reached = loudness + gain
            level = ("silent" if math.isinf(reached) else f"gain {gain:+.2f} dB to {reached:.1f} LUFS"
                     + (f" (short of {target:g}: held back by the {ceiling:g} dBTP ceiling)"
                        if reached < target - 0.05 else ""))
            paths = export_track(track, output.parent, output.stem, (fmt,), info, godot_import=args.godot_import,
                                 split=args.split, loudness_lufs=reached)
        else:
            level = _chip_level(max(float(track.audio.max(initial=0.0)), -float(track.audio.min(initial=0.0))))
            paths = export_track(track, output.parent, output.stem, (fmt,), godot_import=args.godot_import,
                                 sidecar=False)
        frames, loop = track.frames, ((track.loop_start, track.loop_length) if track.looping else None)
    _report_render(output, normalizing, described, paths, frames, rate, preset, loop, level, stats)
    return 0


def _chip_level(peak: float) -> str:
    """How loud an unnormalized render is, from its sample peak (a fraction of full scale)."""
    import math

    return "silent" if peak == 0 else f"the chip's level (sample peak {20 * math.log10(peak):.1f} dBFS)"


def _report_render(output: Path, normalizing: bool, described: list[str], paths: list[Path], frames: int, rate: int,
                   preset: Preset, loop: tuple[int, int] | None, level: str, stats: RenderStats) -> None:
    """What a render wrote, and warnings: clipping, and side files from earlier renders it leaves behind
    (`described`: the files the NAME.json there listed before the render)."""
    what = (f"loop {loop[0] / rate:.3f} s + {loop[1] / rate:.3f} s (LOOPSTART={loop[0]}, LOOPLENGTH={loop[1]})"
            if loop is not None else "jingle")
    print(f"{paths[0]}: {frames / rate:.2f} s at {rate} Hz (preset {preset.name}), {what}, {level}; "
          f"wrote {', '.join(p.name for p in paths)}")
    if stats.clipped or stats.overshoot:
        print(f"chiptune-forge: warning: {paths[0]}: {stats.warning(preset)}", file=sys.stderr)
    sidecar = output.with_name(f"{output.stem}.json")
    stale = _stale_side_files(paths, output.suffix[1:].lower(), rate, loop)
    if not normalizing and output.name in described:  # it described the file this render replaced
        stale.append(sidecar)
    if stale:
        one = len(stale) == 1
        print(f"chiptune-forge: warning: {', '.join(map(str, stale))} {'does' if one else 'do'} not match this "
              f"render and {'was' if one else 'were'} left as {'it was' if one else 'they were'} (delete "
              f"{'it' if one else 'them'} if no longer needed)", file=sys.stderr)
    # A new NAME.json lists only this render's files; point out earlier ones it no longer lists.
    undescribed = [f for f in (output.parent / name for name in described)
                   if normalizing and f not in paths and f.exists() and f not in stale]
    if undescribed:
        print(f"chiptune-forge: warning: {sidecar} now describes this render only; {', '.join(map(str, undescribed))} "
              f"from an earlier render {'is' if len(undescribed) == 1 else 'are'} no longer listed in it",
              file=sys.stderr)


def _stale_side_files(written: list[Path], fmt: str, rate: int, loop: tuple[int, int] | None) -> list[Path]:
    """Files beside a render's NAME.fmt that this render did not rewrite and that no longer fit it: split
    clips of an earlier loop (and their Godot settings), and Godot settings (ours or Godot's own) that loop
    the file differently."""
    from .export import godot_import_agrees
    from .loops import SPLIT_PARTS, godot_import_file, split_clip

    main_file = written[0]
    clips = [main_file.with_name(split_clip(main_file.stem, part) + main_file.suffix) for part in SPLIT_PARTS]
    stale = [f for clip in clips for f in (clip, godot_import_file(clip)) if f not in written and f.exists()]
    settings = godot_import_file(main_file)
    if settings not in written and settings.exists() and not godot_import_agrees(settings, fmt, rate, loop):
        stale.insert(0, settings)
    return stale


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the shipped render presets and built-in instruments",
                       description="List the shipped presets and the built-in instruments, one line each.")
    p.set_defaults(func=_run_presets)


def _run_presets(args: argparse.Namespace) -> int:
    from .presets import list_presets, shipped_presets_dir
    from .snes.instruments import describe_instruments

    presets = list_presets()
    instruments = describe_instruments()
    width = max(len(name) for name, _ in presets + instruments)
    print(f"presets (in {shipped_presets_dir()}; copy one to start your own, then --preset FILE.toml):")
    for name, text in presets:
        print(f"  {name:<{width}}  {text}")
    print("instruments:")
    for name, text in instruments:
        print(f"  {name:<{width}}  {text}")
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_dataset,
    _add_build,
    _add_init,
    _add_watch,
    _add_train,
    _add_evaluate,
    _add_export,
    _add_generate,
    _add_plugins,
    _add_render,
    _add_presets,
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="chiptune-forge",
        description="Train a polyphony RNN on MIDI, generate game music and render it as seamless SNES-style loops.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    parser.set_defaults(commands=sub.choices)  # each command's parser, for errors in that command's words
    return parser


def _join_negative_ranges(argv: Sequence[str]) -> list[str]:
    """`--transpose -4,4` as `--transpose=-4,4`: argparse would take "-4,4" for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--transpose" and re.fullmatch(r"-\d+[,:]-?\d+", arg):
            out[-1] = f"--transpose={arg}"
        else:
            out.append(arg)
    return out


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """argparse, after the spellings it cannot take itself: `--flag=false`, `--transpose -4,4`."""
    try:
        args, extras = parser.parse_known_args(_expand_flag_values(_join_negative_ranges(argv)))
    except ChiptuneError as exc:
        parser.error(str(exc))
    if extras:  # said by the command's own parser, so its usage is the one shown
        command = getattr(args, "commands", {}).get(getattr(args, "command", None) or "", parser)
        command = getattr(args, "actions", {}).get(getattr(args, "plugins_command", None) or "", command)
        command.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _error_text(exc: BaseException) -> str:
    """A user-facing line for an error: an OSError as its file and reason."""
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc.strerror or exc)
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:  # a bad request rather than failed work; a manifest lists all its problems
        for line in getattr(exc, "problems", None) or [str(exc)]:
            print(f"chiptune-forge: error: {line}", file=sys.stderr)
        return 2
    except ChiptuneError as exc:
        print(f"chiptune-forge: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a folder that cannot be written, a disk that is full: the file and the reason
        print(f"chiptune-forge: error: {_error_text(exc)}", file=sys.stderr)
        return getattr(args, "failure_exit", 1)
    except KeyboardInterrupt:
        print("chiptune-forge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run() -> None:
    """The installed `chiptune-forge` command and `python -m chiptune_forge` (tests call main() directly).

    Before the interpreter exits, everything the command made is frozen out of the garbage collector: the
    exit's last collection would otherwise walk every object of numpy and the other loaded modules only to
    free memory the process gives back anyway, about 20 ms, a tenth of a whole render. Exit handlers and
    file closing still run as usual.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
