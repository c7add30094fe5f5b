"""Command-line parsing only: each subcommand parses its flags and calls one function.

Flags accept Magenta's spellings as aliases (`--eval_ratio` beside `--eval-ratio`), and booleans take
`--flag`, `--no-flag` and `--flag=true|false`, so classic polyphony_rnn command lines keep working.
Heavy modules are imported inside each command so that `--help` and the cheap commands start fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import ChiptuneError

TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_flag(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    """A boolean flag as `--name`, `--name=true|false` and `--no-name` (dash and underscore spellings)."""
    dest = name.replace("-", "_")
    spellings = [f"--{name}"] + ([f"--{dest}"] if dest != name else [])
    negatives = [f"--no-{name}"] + ([f"--no_{dest}", f"--no{dest}"] if dest != name else [f"--no{dest}"])
    parser.add_argument(*spellings, dest=dest, nargs="?", const=True, default=default, type=parse_bool,
                        metavar="true|false", help=f"{help} (default: {str(default).lower()})")
    parser.add_argument(*negatives, dest=dest, action="store_false", help=argparse.SUPPRESS)


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
    p.add_argument("--seed", type=int, default=0, help="seed of the train/eval split (default 0)")
    p.add_argument("--transpose", type=parse_int_range, default=(-4, 4), metavar="LO,HI",
                   help="transpositions of the training split, in semitones (default -4,4; write --transpose=-4,4)")
    p.add_argument(*option("min-steps"), dest="min_steps", type=int, default=80,
                   help="drop parts shorter than this many steps (default 80)")
    p.add_argument(*option("max-steps"), dest="max_steps", type=int, default=512,
                   help="cut longer parts into bar-aligned windows of at most this many steps (default 512)")
    p.set_defaults(func=_run_dataset)


def _run_dataset(args: argparse.Namespace) -> int:
    from .dataset import DatasetOptions, build_dataset

    options = DatasetOptions(eval_ratio=args.eval_ratio, seed=args.seed, transpose=args.transpose,
                             min_steps=args.min_steps, max_steps=args.max_steps, recursive=args.recursive)
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
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_dataset,
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ChiptuneError as exc:
        print(f"chiptune-forge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("chiptune-forge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
