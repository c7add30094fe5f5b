"""Batched generation: sample pieces from an exported LSTM in numpy, score them, and write MIDI files.

All requested outputs (and, with beam search, all their candidate branches) are rows of one batch that
advances one event per iteration with carried LSTM state. Sampling is masked so that every stream is a
well-formed polyphony encoding in canonical order, and each step costs at most `max_polyphony` + 1 events:
  - START and END are never sampled (START opens every stream; pieces end where the length says);
  - note events must go strictly down in pitch within a step (the encoding orders them highest first),
    which also rules out a pitch repeated within a step;
  - CONTINUED_NOTE(p) needs p sounding from the previous step;
  - once a step holds `max_polyphony` notes only STEP_END remains (primer notes still to be injected in the
    step keep their voices reserved; a primer chord wider than the cap is written whole).
The probability mass those rules remove from the model's distribution (at temperature 1) is reported per
piece, averaged over its freely sampled events.

Primer semantics (Magenta's flags):
  - the primer is a melody (one entry per step: pitch = note on, -2 = hold, -1 = off), a chord held one
    quarter note, or the first tempo/time-signature section of a MIDI file; it lasts P steps;
  - condition_on_primer: the primer's events are fed through the network and start the output; sampling
    continues from step P;
  - inject_primer_during_generation: generation starts at step 0 and the primer's events for each step
    are forced into that step; the model may add notes above the next forced note (canonical order) and,
    whenever it would move past it (a lower or equal pitch, or STEP_END), the forced note is written
    instead, so the model fills in around the primer. With conditioning on, the primer already fills
    steps 0..P-1, so injection changes nothing; without a primer there is nothing to inject; with both off
    a given primer would be ignored, which is an error.

Randomness: output i uses its own seed, drawn from numpy's SeedSequence of (request.seed, i), and its
uniforms are a counter-based hash of that seed and the event position (and, in beam search, the branch
slot). An output is therefore the same whatever else is generated with it, and neighbouring seeds share
no outputs (two tracks seeded 1 and 2 never get the same candidates).

Beam search (Magenta's beam_size / branch_factor / steps_per_iteration): each output keeps `beam_size`
candidates; every iteration each unfinished candidate is copied `branch_factor` times, every copy samples
`steps_per_iteration` events, and the `beam_size` candidates with the highest log-probability under the
sampling distribution are kept. Finished candidates keep competing with their final score. 1, 1, 1 is
plain sampling.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from .encoding import CONTINUED_NOTE, NEW_NOTE, NUM_CLASSES, START, STEP_END, decode, encode
from .errors import ChiptuneError, print_warning
from .hparams import differences, parse_hparams
from .lstm import LstmModel, LstmState
from .midi import (
    MAX_QPM,
    MIN_QPM,
    STEPS_PER_QUARTER,
    Piece,
    QuantizedPiece,
    piece_from_quantized,
    read_midi,
    split_and_quantize,
    write_midi,
)
from .scores import piece_statistics
from .staging import StagedFiles

STEPS_PER_BAR = 4 * STEPS_PER_QUARTER
DEFAULT_NUM_STEPS = 128
SNES_VOICES = 8
PRIMER_CHORD_STEPS = STEPS_PER_QUARTER
RESULT_FORMAT = "chiptune-forge-generate-1"
_OUTPUT_NAME = re.compile(r"output_\d{2,}\.mid")
NOISE_BLOCK = 64

# rank_score = sum of weight * score. Both likelihoods are mean nats per event (about -0.5..-4), the other
# terms are fractions in 0..1 and sparseness is in halvings of density: a candidate ranks higher when the
# model finds it likely, when its end leads back into its start, when it stays in one key, when it has no
# silent bars, and when it is not much thinner than the music the model learnt from.
RANK_WEIGHTS = {
    "log_likelihood": 1.0,
    "loop_score": 1.0,
    "scale_consistency": 1.0,
    "empty_bar_fraction": -1.0,
    "sparseness": -1.0,
}
RANK_FORMULA = " ".join(f"{'+' if w >= 0 else '-'} {abs(w):g}*{name}" for name, w in RANK_WEIGHTS.items()).lstrip("+ ")


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. Lengths are in steps of a sixteenth note (16 steps to a 4/4 bar)."""

    num_outputs: int = 1
    num_steps: int | None = None  # total steps including the primer; default 128 (8 bars)
    bars: int | None = None  # alternative to num_steps: the result is exactly this many bars
    primer_melody: list[int] | None = None
    primer_pitches: list[int] | None = None
    primer_midi: str | Path | None = None
    condition_on_primer: bool = True
    inject_primer_during_generation: bool = False
    temperature: float = 1.0
    beam_size: int = 1
    branch_factor: int = 1
    steps_per_iteration: int = 1
    max_polyphony: int = SNES_VOICES
    qpm: float | None = 120.0  # None: the primer MIDI's tempo, else 120
    seed: int = 0

    @property
    def total_steps(self) -> int:
        if self.bars is not None:
            return self.bars * STEPS_PER_BAR
        return DEFAULT_NUM_STEPS if self.num_steps is None else self.num_steps

    def validate(self) -> None:
        """Raise a ChiptuneError naming the first setting that cannot work."""
        for name in ("num_outputs", "beam_size", "branch_factor", "steps_per_iteration", "max_polyphony"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ChiptuneError(f"{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}")
        if self.num_steps is not None and self.bars is not None:
            raise ChiptuneError("give the length as num-steps or as bars, not both")
        for name in ("num_steps", "bars"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ChiptuneError(f"{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ChiptuneError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.qpm is not None and not MIN_QPM <= self.qpm <= MAX_QPM:
            raise ChiptuneError(f"qpm must be within {MIN_QPM:g}..{MAX_QPM:g}, got {self.qpm!r}")
        given = [name for name in ("primer_melody", "primer_pitches", "primer_midi") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ChiptuneError(f"give one primer, not several ({', '.join(given)})")
        if given and not self.condition_on_primer and not self.inject_primer_during_generation:
            raise ChiptuneError("the primer would be ignored: turn on condition-on-primer or "
                                "inject-primer-during-generation")
        if not isinstance(self.seed, int):
            raise ChiptuneError(f"seed must be a whole number, got {self.seed!r}")


@dataclass
class GeneratedPiece:
    """One generated piece: its event stream (START first), its notes on the step grid, and its scores."""

    index: int
    seed: int
    events: np.ndarray
    quantized: QuantizedPiece
    scores: dict[str, float]

    def to_piece(self) -> Piece:
        """The notes as a timed Piece at the request's tempo."""
        return piece_from_quantized(self.quantized)


NETWORK_HPARAMS = ("rnn_layer_sizes",)
"""The hparams that shape the network. The others (batch_size, dropout_keep_prob, clip_norm,
learning_rate) only steer training, and Magenta's generator overrides them too."""


def check_hparams(model: LstmModel, text: str) -> None:
    """Magenta passes --hparams at generation too: they must parse, and those that shape the network must
    be the model's; training-only values are accepted and have no effect."""
    given, names = parse_hparams(text, base=model.hparams)
    wrong = differences(model.hparams, given, [n for n in names if n in NETWORK_HPARAMS])
    if wrong:
        raise ChiptuneError(f"--hparams disagree with the model's ({'; '.join(wrong)})")


# ------------------------------------------------------------------------------------------------ primers


def parse_int_list(text: str, flag: str) -> list[int]:
    """Parse a command-line list such as "[60, -2, 64]" (brackets optional)."""
    body = text.strip()
    if not body.startswith("["):
        body = f"[{body}]"
    try:
        values = json.loads(body)
    except json.JSONDecodeError:
        raise ChiptuneError(f"{flag}: expected a list of whole numbers like [60, -2, 64], got {text!r}") from None
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ChiptuneError(f"{flag}: expected a list of whole numbers like [60, -2, 64], got {text!r}")
    return values


def melody_primer(values: Sequence[int]) -> QuantizedPiece:
    """A monophonic primer, one entry per step: 0..127 starts a note, -2 holds, -1 ends the note."""
    if not values:
        raise ChiptuneError("primer melody is empty")
    notes: list[tuple[int, int, int, int]] = []
    current: tuple[int, int] | None = None
    for step, value in enumerate(values):
        if value == -2:
            continue
        if value != -1 and not 0 <= value <= 127:
            raise ChiptuneError(f"primer melody: {value} at position {step} is not a MIDI pitch (0..127), "
                                "-1 (note off) or -2 (hold)")
        if current is not None:
            notes.append((current[0], current[1], step, 100))
        current = (value, step) if value >= 0 else None
    if current is not None:
        notes.append((current[0], current[1], len(values), 100))
    return QuantizedPiece.from_notes(notes, num_steps=len(values))


def pitches_primer(values: Sequence[int]) -> QuantizedPiece:
    """A chord of the given pitches held for one quarter note."""
    if not values:
        raise ChiptuneError("primer pitches are empty")
    bad = [p for p in values if not 0 <= p <= 127]
    if bad:
        raise ChiptuneError(f"primer pitches: {bad[0]} is not a MIDI pitch (0..127)")
    return QuantizedPiece.from_notes([(p, 0, PRIMER_CHORD_STEPS, 100) for p in values], num_steps=PRIMER_CHORD_STEPS)


def midi_primer(path: str | Path, warn: Callable[[str], None] = print_warning) -> QuantizedPiece:
    """The first tempo/time-signature section of a MIDI file, quantized (drums left out). What was wrong in
    the file but could be read anyway goes to `warn`, naming the file."""
    piece = read_midi(path)
    for warning in piece.warnings:
        warn(f"{path}: {warning}")
    parts = split_and_quantize(piece)
    if not parts:
        raise ChiptuneError(f"{path}: the primer MIDI has no pitched notes")
    return parts[0]


def load_primer(request: GenerationRequest, warn: Callable[[str], None] = print_warning) -> QuantizedPiece | None:
    if request.primer_melody is not None:
        return melody_primer(request.primer_melody)
    if request.primer_pitches is not None:
        return pitches_primer(request.primer_pitches)
    if request.primer_midi is not None:
        return midi_primer(request.primer_midi, warn)
    return None


def _steps_of(events: np.ndarray) -> list[np.ndarray]:
    """Split an encoded stream (no START/END) into each step's note events."""
    ends = np.flatnonzero(events == STEP_END)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [events[a:b] for a, b in zip(starts, ends, strict=True)]


# -------------------------------------------------------------------------------------------- the batch


_NO_FLOOR = 128
# _BELOW[f] marks the pitches below f: the notes still allowed in a step whose lowest note so far is f.
_BELOW = (np.arange(128)[None, :] < np.arange(_NO_FLOOR + 1)[:, None]).astype(np.float32)


@dataclass
class _Rows:
    """Per-candidate arrays, one row each. Rows move between batches only through take() and concat()."""

    output: np.ndarray  # which output the row belongs to
    slot: np.ndarray  # the row's branch slot within its output (part of its random counter)
    state: LstmState
    logits: np.ndarray  # logits of the next event
    events: np.ndarray  # [rows, capacity] event stream, START first
    length: np.ndarray  # events written so far
    sounding: np.ndarray  # [rows, 128] pitches that sounded in the previous step (may be continued)
    emitted: np.ndarray  # [rows, 128] pitches written in the current step
    floor: np.ndarray  # the lowest pitch written in the current step (notes must go below it)
    count: np.ndarray  # notes written in the current step
    step: np.ndarray  # the current step
    inject_pos: np.ndarray  # primer events already written in the current step
    score: np.ndarray  # beam score: log-probability under the sampling distribution
    loglik: np.ndarray  # the model's log-likelihood of the events (temperature 1, no mask)
    kept: np.ndarray  # summed probability mass the mask kept over free choices
    choices: np.ndarray  # number of free (sampled, not forced by the primer) choices
    noise: np.ndarray  # [rows, block] the row's next uniforms, computed a block at a time
    noise_from: np.ndarray  # the event position of noise[:, 0]

    def __len__(self) -> int:
        return len(self.output)

    def take(self, rows: np.ndarray) -> _Rows:
        return _Rows(**{f.name: getattr(self, f.name).take(rows) if f.name == "state"
                        else getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        return _Rows(**{f.name: LstmState.concat([p.state for p in parts]) if f.name == "state"
                        else np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Rows)})


@dataclass(frozen=True)
class _Plan:
    """Everything the sampling loop needs besides the rows."""

    keys: np.ndarray  # per output: the hashed seed of its random stream
    stride: int  # counter stride per event: beam_size * branch_factor
    noise_block: int  # uniforms computed at once per row (no more than are used before rows are branched)
    temperature: float
    max_polyphony: int
    total_steps: int
    inject: np.ndarray  # [primer steps, width] forced events per step, padded
    inject_count: np.ndarray  # [primer steps] forced events per step
    track_score: bool


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic): a fast, well-spread hash."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def output_seed(seed: int, index: int) -> int:
    """Output `index`'s own seed (63 bits, so JSON and every int64 reader keep it exact)."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def _keys(seeds: np.ndarray) -> np.ndarray:
    return _mix(_mix(seeds ^ _GOLDEN))


def _uniforms(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1 - 2**-52], each a pure function of (key, counter)."""
    bits = _mix(keys + counters.astype(np.uint64) * _GOLDEN)
    return (bits >> np.uint64(12)).astype(np.float64) * 2.0 ** -52


def _noise(rows: _Rows, plan: _Plan, index: np.ndarray) -> np.ndarray:
    """Each row's uniform for its next event: counter = position * stride + slot under its output's key."""
    column = rows.length - rows.noise_from
    stale = np.flatnonzero(column >= plan.noise_block)
    if len(stale):
        ahead = rows.length[stale, None] + np.arange(plan.noise_block)
        rows.noise[stale] = _uniforms(plan.keys[rows.output[stale], None], ahead * plan.stride + rows.slot[stale, None])
        rows.noise_from[stale] = rows.length[stale]
        column = rows.length - rows.noise_from
    return rows.noise[index, column]


def _mask(values: np.ndarray, below: np.ndarray, continuable: np.ndarray) -> None:
    """Zero (in place) the events that cannot come next: START, END, and the note events not allowed."""
    values[:, :STEP_END] = 0
    values[:, NEW_NOTE:CONTINUED_NOTE] *= below
    values[:, CONTINUED_NOTE:] *= continuable


def _masked_argmax(logits: np.ndarray, below: np.ndarray, continuable: np.ndarray) -> np.ndarray:
    allowed = np.ones(logits.shape, dtype=np.float32)
    _mask(allowed, below, continuable)
    return np.argmax(np.where(allowed > 0, logits, -np.inf), axis=1)


def _choose(rows: _Rows, plan: _Plan) -> np.ndarray:
    """Pick every row's next event (masked sampling plus primer injection) and update the rows' bookkeeping."""
    n = len(rows)
    index = np.arange(n)
    logits = rows.logits
    shifted = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(shifted)
    norm = weights.sum(axis=1)
    primer_steps = len(plan.inject_count)
    pending = None
    room = rows.count < plan.max_polyphony
    if primer_steps:
        at = np.minimum(rows.step, primer_steps - 1)
        forced_left = np.where(rows.step < primer_steps, plan.inject_count[at] - rows.inject_pos, 0)
        pending = forced_left > 0
        room = rows.count + forced_left < plan.max_polyphony  # the step's forced notes keep their voices
    below = _BELOW[np.where(room, rows.floor, 0)]
    continuable = below * rows.sounding

    temperature = plan.temperature
    sampling = None
    if temperature > 0:
        # In float64, so that any temperature > 0 stays finite (float32 cannot divide by 1e-50).
        sampling = weights if temperature == 1.0 else np.exp(shifted.astype(np.float64) / temperature)
        _mask(sampling, below, continuable)
    if temperature != 1.0:
        _mask(weights, below, continuable)
    kept = weights.sum(axis=1) / norm

    if sampling is not None:
        cdf = np.cumsum(sampling, axis=1)
        total = cdf[:, -1].astype(np.float64)
        choice = np.count_nonzero(cdf <= (_noise(rows, plan, index) * total)[:, None], axis=1)
        if not total.all():  # every allowed event underflowed to probability 0: take the likeliest
            degenerate = np.flatnonzero(total == 0)
            choice[degenerate] = _masked_argmax(logits[degenerate], below[degenerate], continuable[degenerate])
    else:
        choice = _masked_argmax(logits, below, continuable)

    if pending is not None and pending.any():
        forced = plan.inject[at, np.minimum(rows.inject_pos, plan.inject.shape[1] - 1)]
        forced_pitch = (forced - NEW_NOTE) % 128
        above = (choice >= NEW_NOTE) & ((choice - NEW_NOTE) % 128 > forced_pitch)
        redirect = pending & ~above
        if plan.track_score and sampling is not None:
            # A redirected choice has the probability of everything that is not a note above the forced one.
            notes_above = (cdf[index, CONTINUED_NOTE - 1] - cdf[index, NEW_NOTE + forced_pitch]
                           + cdf[index, NUM_CLASSES - 1] - cdf[index, CONTINUED_NOTE + forced_pitch])
            p_choice = np.where(redirect, total - notes_above, sampling[index, choice]) / np.maximum(total, 1e-300)
            rows.score += np.log(np.maximum(p_choice, 1e-300))
        choice = np.where(redirect, forced, choice)
        rows.inject_pos += redirect
        rows.kept += np.where(pending, 0.0, kept)
        rows.choices += ~pending
    else:
        if plan.track_score and sampling is not None:
            rows.score += np.log(np.maximum(sampling[index, choice] / np.maximum(total, 1e-300), 1e-300))
        rows.kept += kept
        rows.choices += 1
    rows.loglik += shifted[index, choice] - np.log(norm)
    rows.events[index, rows.length] = choice
    rows.length += 1

    is_note = choice >= NEW_NOTE
    pitch = (choice - NEW_NOTE) & 127
    rows.emitted[index, pitch] |= is_note
    rows.floor = np.where(is_note, pitch, rows.floor)
    rows.count += is_note
    ends = np.flatnonzero(choice == STEP_END)
    if len(ends):
        rows.sounding[ends] = rows.emitted[ends]
        rows.emitted[ends] = False
        rows.floor[ends] = _NO_FLOOR
        rows.count[ends] = 0
        rows.step[ends] += 1
        rows.inject_pos[ends] = 0
    return choice


def _advance(model: LstmModel, rows: _Rows, plan: _Plan, limit: int | None) -> tuple[_Rows, list[_Rows]]:
    """Sample up to `limit` events (None: until every row is finished); finished rows leave the batch.

    A row finishes at the STEP_END that completes its last step; that event is still fed to the network so
    the row keeps the state from which its continuation (the loop score) is measured.
    """
    done: list[_Rows] = []
    taken = 0
    while len(rows) and (limit is None or taken < limit):
        choice = _choose(rows, plan)
        rows.logits, rows.state = model.step(choice, rows.state)
        finished = rows.step >= plan.total_steps
        if finished.any():
            done.append(rows.take(np.flatnonzero(finished)))
            rows = rows.take(np.flatnonzero(~finished))
        taken += 1
    return rows, done


def _branch(rows: _Rows, branch_factor: int) -> _Rows:
    """Copy every row `branch_factor` times; copy k of the row in beam place j gets slot j * F + k."""
    copies = rows.take(np.repeat(np.arange(len(rows)), branch_factor))
    copies.slot = copies.slot * branch_factor + np.tile(np.arange(branch_factor), len(rows))
    copies.noise_from = copies.length - copies.noise.shape[1]
    return copies


def _best(pool: _Rows, keep: int) -> _Rows:
    """Each output's `keep` best rows by score (ties: lower slot, then pool order); slots become beam places."""
    order = np.lexsort((pool.slot, -pool.score, pool.output))
    outputs = pool.output[order]
    first = np.searchsorted(outputs, outputs, side="left")
    place = np.arange(len(order)) - first
    chosen = pool.take(order[place < keep])
    chosen.slot = place[place < keep]
    return chosen


def _search(model: LstmModel, rows: _Rows, plan: _Plan, request: GenerationRequest) -> _Rows:
    """Run sampling or beam search to the end; return each output's final row, in output order."""
    if request.beam_size * request.branch_factor == 1:
        rows, done = _advance(model, rows, plan, None)
        final = _Rows.concat(done)
        return final.take(np.argsort(final.output, kind="stable"))
    finished: list[_Rows] = []
    while len(rows):
        rows, done = _advance(model, _branch(rows, request.branch_factor), plan, request.steps_per_iteration)
        chosen = _best(_Rows.concat([rows, *finished, *done]), request.beam_size)
        over = chosen.step >= plan.total_steps
        finished = [chosen.take(np.flatnonzero(over))]
        rows = chosen.take(np.flatnonzero(~over))
    return _best(finished[0], 1)


def _loop_scores(model: LstmModel, final: _Rows) -> np.ndarray:
    """Mean log-likelihood per event of each piece's own first bar, fed on from the state at its end."""
    bars = []
    for row in range(len(final)):
        stream = final.events[row, 1:final.length[row]]
        ends = np.flatnonzero(stream == STEP_END)
        bars.append(stream[:ends[min(STEPS_PER_BAR, len(ends)) - 1] + 1])
    lengths = np.array([len(b) for b in bars])
    padded = np.full((len(bars), lengths.max()), STEP_END, dtype=np.int64)
    for row, bar in enumerate(bars):
        padded[row, :len(bar)] = bar
    index = np.arange(len(bars))
    logits, state = final.logits, final.state
    total = np.zeros(len(bars))
    for k in range(padded.shape[1]):
        shifted = logits - logits.max(axis=1, keepdims=True)
        logp = shifted[index, padded[:, k]] - np.log(np.exp(shifted).sum(axis=1))
        total += np.where(k < lengths, logp, 0.0)
        if k + 1 < padded.shape[1]:
            logits, state = model.step(padded[:, k], state)
    return total / lengths


# ------------------------------------------------------------------------------------------------ the API


def generate(model: LstmModel, request: GenerationRequest,
             warn: Callable[[str], None] = print_warning) -> list[GeneratedPiece]:
    """Generate `request.num_outputs` pieces as one batch; returned in output order (see rank()). Warnings
    about the primer file (read despite a flaw) go to `warn`; by default to stderr."""
    request.validate()
    primer = load_primer(request, warn)
    qpm = request.qpm if request.qpm is not None else (primer.qpm if request.primer_midi is not None else 120.0)
    total_steps = request.total_steps
    primer_steps = primer.num_steps if primer is not None else 0
    if primer_steps > total_steps:
        source = f"{request.primer_midi}: " if request.primer_midi is not None else ""
        bars = f"{request.bars} bar{'' if request.bars == 1 else 's'}"
        asked = f"{bars} ({total_steps} steps)" if request.bars is not None else f"num-steps ({total_steps})"
        raise ChiptuneError(f"{source}the primer is {primer_steps} steps, longer than the {asked} to generate")
    primer_events = encode(primer, start=False, end=False).astype(np.int64) if primer is not None else None
    conditioned = primer_events is not None and request.condition_on_primer
    prefix = np.concatenate([[START], primer_events]) if conditioned else np.array([START])

    logits, state = model.run(prefix)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    prefix_loglik = float(log_probs[np.arange(len(prefix) - 1), prefix[1:]].sum())

    per_step = _steps_of(primer_events) if primer_events is not None else []
    inject_steps = per_step if request.inject_primer_during_generation and not conditioned else []
    width = max((len(s) for s in inject_steps), default=0)
    inject = np.zeros((len(inject_steps), max(width, 1)), dtype=np.int64)
    for s, step_events in enumerate(inject_steps):
        inject[s, :len(step_events)] = step_events
    inject_count = np.array([len(s) for s in inject_steps], dtype=np.int64)

    start_step = primer_steps if conditioned else 0
    sounding = np.zeros(128, dtype=bool)
    if conditioned and per_step:
        sounding[(per_step[-1] - NEW_NOTE) % 128] = True
    per_step_cap = np.full(total_steps - start_step, request.max_polyphony + 1)
    per_step_cap[:len(inject_count)] = np.maximum(per_step_cap[:len(inject_count)], inject_count + 1)
    capacity = len(prefix) + int(per_step_cap.sum())

    n = request.num_outputs
    noise_block = NOISE_BLOCK if request.beam_size * request.branch_factor == 1 else request.steps_per_iteration
    events = np.full((n, capacity), STEP_END, dtype=np.int16)
    events[:, :len(prefix)] = prefix
    tile = np.zeros(n, dtype=np.int64)
    rows = _Rows(
        output=np.arange(n), slot=np.zeros(n, dtype=np.int64), state=state.take(tile),
        logits=logits[-1:][tile], events=events, length=np.full(n, len(prefix)),
        sounding=np.repeat(sounding[None], n, axis=0), emitted=np.zeros((n, 128), dtype=bool),
        floor=np.full(n, _NO_FLOOR), count=np.zeros(n, dtype=np.int64), step=np.full(n, start_step),
        inject_pos=np.zeros(n, dtype=np.int64), score=np.zeros(n), loglik=np.full(n, prefix_loglik),
        kept=np.zeros(n), choices=np.zeros(n, dtype=np.int64), noise=np.zeros((n, noise_block)),
        noise_from=np.full(n, -noise_block))
    seeds = [output_seed(request.seed, i) for i in range(n)]
    plan = _Plan(keys=_keys(np.array(seeds, dtype=np.uint64)),
                 stride=request.beam_size * request.branch_factor, noise_block=noise_block,
                 temperature=float(request.temperature), max_polyphony=request.max_polyphony,
                 total_steps=total_steps, inject=inject, inject_count=inject_count,
                 track_score=request.beam_size * request.branch_factor > 1)
    final = rows if start_step >= total_steps else _search(model, rows, plan, request)
    loop = _loop_scores(model, final)

    pieces = []
    for i in range(n):
        stream = final.events[i, :final.length[i]].copy()
        quantized = decode(stream, qpm=qpm)
        scores = {
            "log_likelihood": float(final.loglik[i] / max(len(stream) - 1, 1)),
            "loop_score": float(loop[i]),
            **piece_statistics(quantized),
            "mask_removed_mass": float(1.0 - final.kept[i] / final.choices[i]) if final.choices[i] else 0.0,
        }
        scores["rank_score"] = sum(w * scores[name] for name, w in RANK_WEIGHTS.items())
        pieces.append(GeneratedPiece(i, seeds[i], stream, quantized, scores))
    return pieces


def rank(pieces: Sequence[GeneratedPiece]) -> list[GeneratedPiece]:
    """Best first by `rank_score` (see RANK_WEIGHTS); ties keep output order."""
    return sorted(pieces, key=lambda p: -p.scores["rank_score"])


# ---------------------------------------------------------------------------------------------- files


def output_name(index: int, num_outputs: int) -> str:
    return f"output_{index + 1:0{max(2, len(str(num_outputs)))}d}.mid"


def write_outputs(pieces: Sequence[GeneratedPiece], output_dir: str | Path, request: GenerationRequest,
                  model: LstmModel) -> Path:
    """Write one MIDI file per piece and generate.json (per output: file, seed, size, scores, rank)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ChiptuneError(f"{out}: is a file, not an output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ChiptuneError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    previous = _listed_outputs(out / "generate.json")
    places = {p.index: place for place, p in enumerate(rank(pieces), start=1)}
    outputs = []
    for p in pieces:
        name = output_name(p.index, len(pieces))
        q = p.quantized
        outputs.append({
            "file": name, "index": p.index, "seed": p.seed, "rank": places[p.index],
            "num_notes": len(q), "num_steps": q.num_steps,
            "seconds": q.num_steps * 60.0 / q.qpm / STEPS_PER_QUARTER, "num_events": len(p.events),
            **p.scores,
        })
    effective = replace(request, qpm=pieces[0].quantized.qpm) if pieces else request
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(effective).items()}
    result = {
        "format": RESULT_FORMAT,
        "model": {"path": str(model.path) if model.path else None, "fingerprint": model.model_fingerprint(),
                  "layers": list(model.layer_sizes)},
        "request": {**settings, "total_steps": request.total_steps},
        "ranking": f"rank_score = {RANK_FORMULA}",
        "mask_removed_mass": float(np.mean([p.scores["mask_removed_mass"] for p in pieces])),
        "outputs": outputs,
    }
    path = out / "generate.json"
    with StagedFiles() as files:  # no output changes unless all can be written
        for p, entry in zip(pieces, outputs, strict=True):
            files.write(out / entry["file"], lambda tmp, piece=p: write_midi(piece.to_piece(), tmp))
        files.write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8"))
        files.commit()
    for name in previous - {o["file"] for o in outputs}:  # an earlier run's outputs that this one did not replace
        (out / name).unlink(missing_ok=True)
    return path


def _listed_outputs(result_file: Path) -> set[str]:
    """The MIDI files an earlier generate.json in the folder lists (plain output names only)."""
    try:
        listed = {str(o["file"]) for o in json.loads(result_file.read_text(encoding="utf-8"))["outputs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {name for name in listed if _OUTPUT_NAME.fullmatch(name)}
