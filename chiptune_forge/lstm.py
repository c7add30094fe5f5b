"""The trained network run in numpy: load an exported model and step a batch of sequences one event at a time.

Generation feeds one event per sequence per step, so the network runs as a recurrence with carried state;
numpy does that in a fraction of the time TensorFlow needs just to import, which keeps a build step fast.

Batches are padded to a whole number of row tiles and every matrix product is a stack of fixed-size
products (tiles of rows): BLAS computes a row of one large product with different last bits depending on how many rows
there are (other kernels, other blocking), but a fixed-size product treats each of its rows alike. So a
sequence's numbers, and with them its samples, do not depend on how many sequences are generated beside it.
Numpy's element-wise functions and row reductions are per-row exact already. A weight matrix too large to
stay in a core's cache is multiplied in tiles of 16 rows (it is read once per 16 rows, not once per 4);
smaller ones in tiles of 4. Small batches (8 rows or fewer) use 4-row tiles throughout when, checked once
at load on this machine's BLAS, a 4-row and a 16-row tile give a row the same bits; otherwise every batch
of such a model is padded to 16 rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .encoding import ENCODING_VERSION, NUM_CLASSES, STEP_END
from .errors import ChiptuneError
from .hparams import HParams

MODEL_FORMAT = "chiptune-forge-lstm-1"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "default"
MODEL_JSON = "model.json"
WEIGHTS_NPZ = "weights.npz"
SMALL_TILE, LARGE_TILE = 4, 16  # rows per matrix product, for weights under / from LARGE_WEIGHT_BYTES
LARGE_WEIGHT_BYTES = 1 << 20
_PAD_EVENTS = np.full(LARGE_TILE, STEP_END, dtype=np.int64)


def _pad_for(rows: int, pads: tuple[int, int]) -> int:
    """The row padding for a batch: the large one once it would be more than half real rows."""
    return pads[1] if 2 * rows > pads[1] else pads[0]


def _padded(rows: int, pads: tuple[int, int]) -> int:
    return rows + (-rows % _pad_for(rows, pads))


@dataclass
class LstmState:
    """Hidden and cell state of every layer: `rows` real rows, padded to a multiple of `pad`.

    `pads` is the model's (small-batch, large-batch) row padding; a state of more than half as many rows
    as the larger pad uses it, a smaller one the other (see the module doc)."""

    h: list[np.ndarray]
    c: list[np.ndarray]
    rows: int
    pads: tuple[int, int]

    @property
    def pad(self) -> int:
        return _pad_for(self.rows, self.pads)

    def take(self, rows: np.ndarray) -> LstmState:
        """The given rows, in that order (padding rows repeat a real row, so they stay finite)."""
        index = np.zeros(_padded(len(rows), self.pads), dtype=np.int64)
        index[:len(rows)] = rows
        return LstmState([h[index] for h in self.h], [c[index] for c in self.c], len(rows), self.pads)

    @staticmethod
    def concat(states: list[LstmState]) -> LstmState:
        layers = range(len(states[0].h))
        joined = LstmState([np.concatenate([s.h[i][:s.rows] for s in states]) for i in layers],
                           [np.concatenate([s.c[i][:s.rows] for s in states]) for i in layers], 0, states[0].pads)
        return joined.take(np.arange(sum(s.rows for s in states)))


def _tile(w: np.ndarray) -> int:
    return LARGE_TILE if w.nbytes >= LARGE_WEIGHT_BYTES else SMALL_TILE


def _rowwise(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """x @ w as a stack of fixed-size row products, at most `pad` rows each (len(x) is a multiple of `pad`;
    see the module doc)."""
    tile = min(_tile(w), pad)
    return np.matmul(x.reshape(-1, tile, x.shape[1]), w).reshape(len(x), w.shape[1])


def _tiles_agree(w: np.ndarray) -> bool:
    """Whether 4-row and 16-row products give every row of a test input the same bits with this BLAS."""
    x = np.random.default_rng(0).standard_normal((LARGE_TILE, w.shape[0])).astype(np.float32)
    small = np.matmul(x.reshape(-1, SMALL_TILE, w.shape[0]), w).reshape(LARGE_TILE, -1)
    return bool(np.array_equal(small, np.matmul(x, w)))


class LstmModel:
    """An exported polyphony LSTM: embedding -> stacked Keras-layout LSTM layers -> dense 259 logits.

    At load the weights are rearranged for stepping: the first layer's input projection is folded into
    the embedding (one table row per event), later layers multiply [input, hidden] by one stacked matrix,
    and gate columns are reordered to (i, f, o, c) with the sigmoid gates pre-halved so that one tanh over
    all four gates gives them all (sigmoid(z) = (1 + tanh(z / 2)) / 2).
    """

    def __init__(self, arrays: dict[str, np.ndarray], info: dict, path: Path | None = None) -> None:
        self.info = info
        self.path = path
        self._fingerprint = _fingerprint(arrays, info)
        where = str(path) if path else "model"

        def need(name: str) -> np.ndarray:
            if name not in arrays:
                raise ChiptuneError(f"{where}: weights lack the array {name!r}")
            return np.asarray(arrays[name], dtype=np.float32)

        emb = need("embedding")
        sizes: list[int] = []
        while f"lstm{len(sizes)}_kernel" in arrays:
            recurrent = need(f"lstm{len(sizes)}_recurrent")
            sizes.append(int(recurrent.shape[0]) if recurrent.ndim else 0)
        dense_k, dense_b = need("dense_kernel"), need("dense_bias")
        if not sizes:
            raise ChiptuneError(f"{where}: weights have no LSTM layer (lstm0_kernel missing)")
        if emb.ndim != 2 or emb.shape[0] != NUM_CLASSES:
            raise ChiptuneError(f"{where}: embedding has shape {emb.shape}, expected [{NUM_CLASSES}, E]")
        self.layer_sizes = tuple(sizes)
        self.embedding_dim = int(emb.shape[1])
        self._table = np.empty(0, dtype=np.float32)
        self._weights: list[np.ndarray] = []
        self._biases: list[np.ndarray] = []
        width = self.embedding_dim
        for i, u in enumerate(sizes):
            kernel, recurrent, bias = need(f"lstm{i}_kernel"), need(f"lstm{i}_recurrent"), need(f"lstm{i}_bias")
            for name, arr, shape in ((f"lstm{i}_kernel", kernel, (width, 4 * u)),
                                     (f"lstm{i}_recurrent", recurrent, (u, 4 * u)),
                                     (f"lstm{i}_bias", bias, (4 * u,))):
                if arr.shape != shape:
                    raise ChiptuneError(f"{where}: {name} has shape {list(arr.shape)}, expected {list(shape)}")
            order = np.concatenate([np.arange(0, 2 * u), np.arange(3 * u, 4 * u), np.arange(2 * u, 3 * u)])
            scale = np.ones(4 * u, dtype=np.float32)
            scale[:3 * u] = 0.5
            if i == 0:
                self._table = np.ascontiguousarray(((emb @ kernel + bias)[:, order] * scale).astype(np.float32))
                self._weights.append(np.ascontiguousarray(recurrent[:, order] * scale))
                self._biases.append(np.zeros(0, dtype=np.float32))  # layer 0 has its bias in the table
            else:
                self._weights.append(np.ascontiguousarray(np.vstack([kernel, recurrent])[:, order] * scale))
                self._biases.append(bias[order] * scale)
            width = u
        if dense_k.shape != (width, NUM_CLASSES) or dense_b.shape != (NUM_CLASSES,):
            raise ChiptuneError(f"{where}: dense layer has shapes {list(dense_k.shape)} and {list(dense_b.shape)}, "
                                f"expected [{width}, {NUM_CLASSES}] and [{NUM_CLASSES}]")
        self._dense_k = np.ascontiguousarray(dense_k)
        self._dense_b = dense_b
        large = [w for w in [*self._weights, self._dense_k] if _tile(w) == LARGE_TILE]
        self._pad = LARGE_TILE if large else SMALL_TILE
        self._small_pad = SMALL_TILE if all(_tiles_agree(w) for w in large) else self._pad
        declared = info.get("layers")
        if declared is not None and [int(s) for s in declared] != list(sizes):
            raise ChiptuneError(f"{where}: model.json lists layers {declared} but the weights have {list(sizes)}")

    @property
    def hparams(self) -> HParams:
        """The hyperparameters the model was trained with (as recorded at export)."""
        return HParams.from_dict({**self.info.get("hparams", {}), "rnn_layer_sizes": list(self.layer_sizes)})

    def model_fingerprint(self) -> str:
        """A stable hash of the weights and model.json, for build caches: it changes exactly when they do."""
        return self._fingerprint

    def initial_state(self, batch: int) -> LstmState:
        pads = (self._small_pad, self._pad)
        rows = _padded(batch, pads)
        return LstmState([np.zeros((rows, u), dtype=np.float32) for u in self.layer_sizes],
                         [np.zeros((rows, u), dtype=np.float32) for u in self.layer_sizes], batch, pads)

    def step(self, events: np.ndarray, state: LstmState) -> tuple[np.ndarray, LstmState]:
        """Feed one event per row; return the logits of the next event [rows, 259] and the new state."""
        extra = len(state.h[0]) - state.rows
        padded = np.concatenate([events, _PAD_EVENTS[:extra]]) if extra else events
        hs, cs = [], []
        x = np.empty(0, dtype=np.float32)
        for i, u in enumerate(self.layer_sizes):
            h, c = state.h[i], state.c[i]
            if i == 0:
                z = self._table[padded] + _rowwise(h, self._weights[0], state.pad)
            else:
                z = _rowwise(np.concatenate([x, h], axis=1), self._weights[i], state.pad)
                z += self._biases[i]
            t = np.tanh(z, out=z)
            gates = t[:, :3 * u]
            gates *= 0.5
            gates += 0.5
            c = gates[:, u:2 * u] * c
            c += gates[:, :u] * t[:, 3 * u:]
            x = gates[:, 2 * u:] * np.tanh(c)
            hs.append(x)
            cs.append(c)
        logits = _rowwise(x, self._dense_k, state.pad)[:state.rows]
        logits += self._dense_b
        return logits, LstmState(hs, cs, state.rows, state.pads)

    def run(self, events: np.ndarray | list[int], state: LstmState | None = None) -> tuple[np.ndarray, LstmState]:
        """Feed one sequence from `state` (zero by default): logits after each event [T, 259] and the end state."""
        seq = np.asarray(events, dtype=np.int64)
        state = state or self.initial_state(1)
        out = np.empty((len(seq), NUM_CLASSES), dtype=np.float32)
        for t in range(len(seq)):
            logits, state = self.step(seq[t:t + 1], state)
            out[t] = logits[0]
        return out, state


def _fingerprint(arrays: dict[str, np.ndarray], info: dict) -> str:
    """sha256 over model.json (canonical form) and every array's name, dtype, shape and bytes.

    Hashing contents rather than files keeps the fingerprint stable when the same weights are re-saved
    (npz archives carry timestamps).
    """
    digest = hashlib.sha256(json.dumps(info, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def resolve_model_dir(spec: str | Path | None) -> Path:
    """`None`/"default" -> the shipped model; a run dir (with export/) -> its export; else the folder given."""
    if spec is None or str(spec) == "default":
        if not (DEFAULT_MODEL_DIR / MODEL_JSON).is_file():
            raise ChiptuneError(f"the default model is not installed ({DEFAULT_MODEL_DIR} has no {MODEL_JSON}); "
                                "pass --model DIR or --run-dir RUN")
        return DEFAULT_MODEL_DIR
    path = Path(spec)
    if not path.is_dir():
        what = "is a file, not a model or run folder" if path.exists() else "model folder not found"
        raise ChiptuneError(f"{path}: {what}")
    if (path / MODEL_JSON).is_file():
        return path
    if (path / "export").is_dir() or (path / "hparams.json").is_file():
        export = path / "export"
        if not (export / MODEL_JSON).is_file() or not (export / WEIGHTS_NPZ).is_file():
            raise ChiptuneError(f"{path}: the run has no exported weights ({export / WEIGHTS_NPZ} is missing); "
                                "train it until it exports")
        return export
    raise ChiptuneError(f"{path}: not a model folder (no {MODEL_JSON}) and not a run folder (no export/)")


def read_export(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """An export folder's model.json and raw arrays, checked against the format this version reads."""
    json_path, npz_path = folder / MODEL_JSON, folder / WEIGHTS_NPZ
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChiptuneError(f"{folder}: {MODEL_JSON} is missing") from None
    except (OSError, ValueError) as exc:
        raise ChiptuneError(f"{json_path}: cannot read ({exc})") from None
    if not isinstance(info, dict):
        raise ChiptuneError(f"{json_path}: expected a JSON object")
    for key, want in (("format", MODEL_FORMAT), ("encoding", ENCODING_VERSION), ("num_classes", NUM_CLASSES)):
        if info.get(key) != want:
            raise ChiptuneError(f"{json_path}: {key} is {info.get(key)!r}, this version reads {want!r}")
    try:
        data = npz_path.read_bytes()
    except FileNotFoundError:
        raise ChiptuneError(f"{folder}: {WEIGHTS_NPZ} is missing (the model has no weights)") from None
    except OSError as exc:
        raise ChiptuneError(f"{npz_path}: cannot read ({exc.strerror or exc})") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ChiptuneError(f"{npz_path}: not a readable weights archive ({exc})") from None
    return info, arrays


def load_model(spec: str | Path | None = None) -> LstmModel:
    """Load an exported model: "default"/None, an export folder, or a training run folder."""
    folder = resolve_model_dir(spec)
    info, arrays = read_export(folder)
    return LstmModel(arrays, info, folder)
