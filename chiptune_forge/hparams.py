"""Model hyperparameters in Magenta's string form: `batch_size=64,rnn_layer_sizes=[128,128,128]`.

Kept free of TensorFlow so generation can check a command line's hparams against a run's without it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from .errors import ChiptuneError, did_you_mean

MAX_SEED = 2**32 - 1
"""The largest seed numpy's and TensorFlow's generators take (a seed is 0 .. MAX_SEED)."""


@dataclass(frozen=True)
class HParams:
    batch_size: int = 64
    rnn_layer_sizes: tuple[int, ...] = (256, 256, 256)
    dropout_keep_prob: float = 0.5
    clip_norm: float = 5.0
    learning_rate: float = 0.001

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rnn_layer_sizes"] = list(self.rnn_layer_sizes)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> HParams:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "rnn_layer_sizes" in values:
            values["rnn_layer_sizes"] = tuple(int(x) for x in values["rnn_layer_sizes"])
        return cls(**values)

    def to_string(self) -> str:
        sizes = ",".join(str(s) for s in self.rnn_layer_sizes)
        return (f"batch_size={self.batch_size},rnn_layer_sizes=[{sizes}],dropout_keep_prob={self.dropout_keep_prob:g},"
                f"clip_norm={self.clip_norm:g},learning_rate={self.learning_rate:g}")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...] (layer size lists contain commas)."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip() or not parts:  # a trailing comma ends the list, as in Magenta's parser
        parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_hparams(text: str | None, base: HParams | None = None) -> tuple[HParams, set[str]]:
    """Parse a Magenta hparams string over `base`; returns the result and the names that were given.

    An unknown name or a bad value is a ChiptuneError naming it (with a did-you-mean for names).
    """
    result = base or HParams()
    given: set[str] = set()
    if not text or not text.strip():
        return result, given
    names = [f.name for f in fields(HParams)]
    for item in _split_top_level(text.strip().strip("\"'")):
        if not item:
            raise ChiptuneError(f"--hparams: an empty entry between commas in {text!r}")
        if "=" not in item:
            raise ChiptuneError(f"--hparams: {item!r} is not name=value")
        name, raw = (s.strip() for s in item.split("=", 1))
        if name not in names:
            hint = did_you_mean(name, names) or f" (known: {', '.join(names)})"
            raise ChiptuneError(f"--hparams: unknown hyperparameter {name!r}{hint}")
        if name in given:
            raise ChiptuneError(f"--hparams: {name} is given twice")
        result = replace(result, **{name: _convert(name, raw)})
        given.add(name)
    return result, given


_EXPECTED = {
    "rnn_layer_sizes": "a list of whole numbers above 0, e.g. [128,128,128]",
    "batch_size": "a whole number above 0, e.g. 64",
    "dropout_keep_prob": "a number above 0 up to 1, e.g. 0.5",
    "clip_norm": "a finite number above 0, e.g. 5",
    "learning_rate": "a number above 0 up to 1, e.g. 0.001",
}


def _convert(name: str, raw: str) -> object:
    try:
        if name == "rnn_layer_sizes":
            value = json.loads(raw)  # a list, as in Magenta (a bare number is refused there too)
            if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
                raise ValueError
            return tuple(value)
        if name == "batch_size":
            value = int(raw)
            if value < 1:
                raise ValueError
            return value
        value = float(raw)
    except (ValueError, json.JSONDecodeError):
        raise ChiptuneError(f"--hparams: bad value {raw!r} for {name} (expected {_EXPECTED[name]})") from None
    limits = {"dropout_keep_prob": (0.0, 1.0, False), "clip_norm": (0.0, float("inf"), True),
              "learning_rate": (0.0, 1.0, False)}
    lo, hi, open_hi = limits[name]
    if not lo < value <= hi or (open_hi and value == float("inf")):
        raise ChiptuneError(f"--hparams: {name}={raw} is out of range (expected {_EXPECTED[name]})")
    return value


def differences(run: HParams, given: HParams, names: set[str]) -> list[str]:
    """The given names whose values differ from the run's, as `name: given X, run has Y`."""
    out = []
    for name in sorted(names):
        a, b = getattr(given, name), getattr(run, name)
        if a != b:
            out.append(f"{name}: given {a}, the run has {b}")
    return out
