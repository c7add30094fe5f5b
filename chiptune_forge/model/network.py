"""The polyphony network: event ids -> embedding -> stacked LSTM -> dropout -> 259 logits.

The embedding is `rnn_layer_sizes[0]` wide: the reference feeds the one-hot vector of each event, and an
embedding row is exactly that vector times a weight matrix, computed as a lookup.

The LSTM math is Keras's (gates i, f, c, o; sigmoid recurrent activation, tanh), with the same weight
layout as `keras.layers.LSTM` (kernel [in, 4u], recurrent kernel [u, 4u], bias [4u]), so the exported
weights drive any standard LSTM. Only the schedule differs, for speed on a CPU:
- the network runs time-major inside; a batch row may hold several sequences one after another, and the
  layers reset their state where `keep` is 0 (packed batches, see train.BatchSchedule);
- with TensorFlow's loops, each layer's input projection for every timestep is one large matrix product
  before the recurrent loop, which then only multiplies the hidden state; the first layer's is a lookup in
  embedding @ kernel, one small product for the 259 events (the layer holds the embedding); the loops are
  compiled with XLA, the rows of a batch split into independent groups whose loops run at the same time on
  different cores, a step being one matrix product, one tanh over all four gates and a few multiply-adds;
- with the native loops (`loops="native"`, see native.py, lstm_loops.cc and output_loss.cc; where the
  machine has a C++ compiler) the loops make those input products themselves, block by block in cache,
  apply the layer's dropout, and give the inputs' gradient on the way back; the output layer and its
  masked cross-entropy are one native pass over blocks of rows (`_native_output_loss`);
- the backward pass is written out by hand: the loop runs back through time computing the gate gradients,
  and the weight gradients are then large matrix products over all timesteps instead of one small product
  accumulated per step (written as einsums, which TensorFlow runs faster than a transposed matmul);
- optionally (`matmul_dtype`, chosen by the trainer) those large products compute in bfloat16, which
  CPUs with AMX multiply several times faster than float32; the loops and the weights stay float32;
- dropout draws 16 random bits per value instead of a float (in the native loops, a hash of the seed and
  the value's position, drawn again for the backward pass), and without the native output layer the
  training loss, its accuracy and its gradient come from one compiled pass over the logits (`masked_loss`).
"""

from __future__ import annotations

import os

from ..encoding import NUM_CLASSES
from ..hparams import HParams
from .framework import keras, tf
from .native import UNIT_MULTIPLE, check_units, load

LOOP_GROUPS = max(1, min(4, os.cpu_count() or 1))
_compiled = tf.function(jit_compile=True, reduce_retracing=True)
MATMUL_DTYPES = ("float32", "bfloat16")


def embedding_dim(hparams: HParams) -> int:
    """Width of the event embedding: the first LSTM layer's width."""
    return hparams.rnn_layer_sizes[0]


def _split_gates(z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    i, f, g, o = tf.split(z, 4, axis=-1)
    return tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)


def _zeros(like: tf.Tensor, width: tf.Tensor, dtype: tf.DType | None = None) -> tf.Tensor:
    """[rows of `like` [T, B, ...], width] zeros, sized at run time."""
    return tf.zeros(tf.stack([tf.shape(like)[1], width]), dtype=dtype or like.dtype)


def _gate_scale(units: tf.Tensor) -> tf.Tensor:
    """Per gate column: 1/2 for the sigmoid gates i, f, o and 1 for g, since sigmoid(z) = (1 + tanh(z/2)) / 2
    lets one tanh over all four gates replace three sigmoids and a tanh."""
    half, one = tf.fill([units], 0.5), tf.ones([units])
    return tf.concat([half, half, one, half], axis=0)


def _rows(tensor: tf.Tensor, group: int, groups: int) -> tf.Tensor:
    """Rows (independent sequences) of one of `groups` equal groups of a [T, B, ...] tensor. Inside an XLA
    function the slice is read in place by the loop instead of being copied out first."""
    rows = tf.shape(tensor)[1]
    return tensor[:, rows * group // groups:rows * (group + 1) // groups]


@_compiled
def _forward_loop(xproj: tf.Tensor, keep: tf.Tensor, bias: tf.Tensor, recurrent: tf.Tensor, group: int,
                  groups: int) -> tuple[tf.Tensor, ...]:
    """One row group's hidden states [T, b, u] from zero state, given the input projections without bias
    (float32 or bfloat16, all rows) and `keep` [T, B] (0 where a sequence starts, so that the state is reset
    to zero there), and per step what the backward pass needs: [T, b, 4u] = each gate's
    derivative times what it multiplies (the gate gradients are these times dc or dh), and [T, b, 2u] =
    o * tanh'(c) (dc per dh), then the forget gate. With bfloat16 projections the hidden states come in
    bfloat16 too, for the weight gradient's product, after the float32 ones.

    The loop runs one step at a time, so the fixed cost of each operation in it counts more than its
    arithmetic; the derivatives are computed here, where the gates are at hand, instead of in passes over
    stored gates before the backward loop. They are written over the step's own input projections, which
    the step has just read: no separate buffer is cleared and filled, and the write goes to memory already
    in cache. (How XLA fuses the step depends on the exact form of the expressions: these are the fastest
    of the equivalent forms measured.)
    """
    units = tf.shape(recurrent)[0]
    scale = _gate_scale(units)
    rows = _rows(xproj, group, groups)
    keep = _rows(keep, group, groups)[..., None]
    zeros = _zeros(rows, units, tf.float32)
    steps = tf.shape(rows)[0]
    records = tf.TensorArray(tf.float32, size=steps).unstack(tf.cast(rows, tf.float32))
    cell = tf.TensorArray(tf.float32, size=steps)
    hidden = tf.TensorArray(tf.float32, size=steps)

    def step(k, h, c, records, cell, hidden):
        h, c = h * keep[k], c * keep[k]
        t = tf.tanh((records.read(k) + bias + tf.matmul(h, recurrent)) * scale)
        ti, tf_, g, to = tf.split(t, 4, axis=-1)
        i, f, o = 0.5 * ti + 0.5, 0.5 * tf_ + 0.5, 0.5 * to + 0.5
        c_next = f * c + i * g
        tc = tf.tanh(c_next)
        h = o * tc
        derivs = tf.concat([g * i * (1.0 - i), c * f * (1.0 - f), i * (1.0 - g * g), tc * o * (1.0 - o)], axis=-1)
        return (k + 1, h, c_next, records.write(k, derivs),
                cell.write(k, tf.concat([o * (1.0 - tc * tc), f], axis=-1)), hidden.write(k, h))

    _, _, _, records, cell, hidden = tf.while_loop(lambda k, *_: k < steps, step,
                                                   (0, zeros, zeros, records, cell, hidden))
    kept = records.stack()
    hs = hidden.stack()
    if xproj.dtype == tf.float32:
        return hs, kept, cell.stack()
    return hs, tf.cast(hs, xproj.dtype), kept, cell.stack()


@_compiled
def _backward_loop(keep: tf.Tensor, dhs: tf.Tensor, kept: tf.Tensor, cell: tf.Tensor, recurrent: tf.Tensor,
                   group: int, groups: int, dtype: tf.DType) -> tuple[tf.Tensor, tf.Tensor]:
    """One row group's gradients of the gate pre-activations [T, b, 4u] as `dtype`, given the gradients of
    the hidden states (all rows) and the forward loop's records, and of the bias (their float32 sum over
    steps and rows).

    The loop is left with a few multiply-adds and the matrix product per step; it writes each step's
    gradients over that step's gate derivatives, which it has just read.
    """
    units = tf.shape(recurrent)[0]
    dh_out = _rows(dhs, group, groups)
    keep = _rows(keep, group, groups)[..., None]
    steps = tf.shape(dh_out)[0]
    derivs = tf.TensorArray(tf.float32, size=steps).unstack(kept)
    zeros = _zeros(dh_out, units)  # sized at run time, as the rows of a relaxed trace are
    recurrent_t = tf.transpose(recurrent)

    def back(k, dh_next, dc_next, derivs):
        dc_per_dh, forget = tf.split(cell[k], 2, axis=-1)
        dh = dh_out[k] + dh_next
        dc = dc_next + dh * dc_per_dh
        dz = tf.concat([dc, dc, dc, dh], axis=-1) * derivs.read(k)
        # Where a sequence starts, nothing goes back to the step before.
        return k - 1, tf.matmul(dz, recurrent_t) * keep[k], dc * forget * keep[k], derivs.write(k, dz)

    dz = tf.while_loop(lambda k, *_: k >= 0, back, (steps - 1, zeros, zeros, derivs))[3].stack()
    return tf.cast(dz, dtype), tf.reduce_sum(dz, axis=[0, 1])


@_compiled
def _inference_loop(xproj: tf.Tensor, recurrent: tf.Tensor) -> tf.Tensor:
    units = tf.shape(recurrent)[0]
    zeros = _zeros(xproj, units)

    def step(carry, zx):
        h, c = carry
        i, f, g, o = _split_gates(zx + tf.matmul(h, recurrent))
        c = f * c + i * g
        return o * tf.tanh(c), c

    hs, _ = tf.scan(step, xproj, initializer=(zeros, zeros))
    return hs


def _row_groups(tensor: tf.Tensor) -> list[tf.Tensor]:
    """Split [T, B, ...] into LOOP_GROUPS slices of rows (independent sequences) for parallel loops."""
    if LOOP_GROUPS == 1:
        return [tensor]
    rows = tf.shape(tensor)[1]
    bounds = [rows * k // LOOP_GROUPS for k in range(LOOP_GROUPS + 1)]
    return [tensor[:, bounds[k]:bounds[k + 1]] for k in range(LOOP_GROUPS)]


def _join(parts: list[tf.Tensor]) -> tf.Tensor:
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)


def _weight_gradient(inputs: tf.Tensor, d_outputs: tf.Tensor) -> tf.Tensor:
    """inputs^T @ d_outputs for [rows, in] and [rows, out]: a weight's gradient summed over every row. Written
    as an einsum because TensorFlow runs that about 1.5x faster on a CPU than its matmul with transpose_a,
    which takes a slower kernel for these shapes (one short side, one of tens of thousands of rows)."""
    return tf.einsum("ki,kj->ij", inputs, d_outputs)


def _project(flat: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """flat @ kernel, differentiated with `_weight_gradient` for the kernel."""

    @tf.custom_gradient
    def run(flat, kernel):
        def grad(d: tf.Tensor):
            return tf.matmul(d, kernel, transpose_b=True), _weight_gradient(flat, d)

        return tf.matmul(flat, kernel), grad

    return run(flat, kernel)


def _recurrent(xproj: tf.Tensor, keep: tf.Tensor, bias: tf.Tensor, recurrent: tf.Tensor) -> tf.Tensor:
    """Hidden states [T, B, u] of one LSTM layer from zero state, given its input projections without bias
    [T, B, 4u] (float32, or bfloat16 for bfloat16 products) and `keep` [T, B]: 0 where a sequence starts
    (a row may hold several sequences one after another; the state is reset to zero there), else 1.

    Differentiable through a hand-written backward pass: the recurrent loops run back through time for the
    gate gradients, which are the projections' gradient (in the projections' dtype), and the recurrent
    kernel's gradient is then one large matrix product over all steps. The loops' compiled functions convert
    bfloat16 projections to float32 themselves, since TensorFlow's own conversion of a whole tensor costs
    more than the product that made it.
    """
    low = xproj.dtype

    @tf.custom_gradient
    def run(xproj, bias, recurrent):
        # The loops are differentiated by `grad` below, never by tracing through them.
        xproj, bias, recurrent = (tf.stop_gradient(v) for v in (xproj, bias, recurrent))
        units = tf.shape(recurrent)[0]
        outs = [_forward_loop(xproj, keep, bias, recurrent, k, LOOP_GROUPS) for k in range(LOOP_GROUPS)]
        hs = _join([o[0] for o in outs])

        def grad(dhs: tf.Tensor):
            backs = [_backward_loop(keep, dhs, *o[-2:], recurrent, k, LOOP_GROUPS, low) for k, o in enumerate(outs)]
            dz = _join([b[0] for b in backs])
            h_low = hs if low == tf.float32 else _join([o[1] for o in outs])
            h_prev = tf.concat([tf.zeros_like(h_low[:1]), h_low[:-1]], axis=0) * tf.cast(keep, low)[..., None]
            h_prev = tf.reshape(h_prev, [-1, units])
            d_recurrent = _weight_gradient(h_prev, tf.reshape(dz, [-1, 4 * units]))
            return dz, tf.add_n([b[1] for b in backs]), tf.cast(d_recurrent, tf.float32)

        return hs, grad

    return run(xproj, bias, recurrent)


def _or_none(argument: tf.Tensor | None, dtype: tf.DType = tf.int64) -> tf.Tensor:
    """An optional argument of the native kernels as a tensor for tf.numpy_function: an empty one for none."""
    return tf.zeros([0], dtype) if argument is None else argument


def _native_kernels():
    """The native kernels (native.py); the trainer checks beforehand that they load."""
    kernels = load()
    if isinstance(kernels, str):
        raise RuntimeError(kernels)
    return kernels


def _native_recurrent(xproj: tf.Tensor, keep: tf.Tensor, bias: tf.Tensor, recurrent: tf.Tensor) -> tf.Tensor:
    """`_recurrent` with the native loops (native.py): the same results, computed outside TensorFlow's
    kernels. Their records stay numpy buffers between the forward and the backward call."""
    units = recurrent.shape[0]
    check_units(units)
    loops = _native_kernels()
    low = xproj.dtype

    @tf.custom_gradient
    def run(xproj, bias, recurrent):
        xproj, bias, recurrent = (tf.stop_gradient(v) for v in (xproj, bias, recurrent))
        shape = tf.shape(xproj)
        hs, h_prev, derivs, cell = tf.numpy_function(
            loops.forward, [tf.cast(xproj, tf.float32), keep, bias, recurrent], [tf.float32] * 4, stateful=False)
        hs = tf.reshape(hs, tf.stack([shape[0], shape[1], units]))

        def grad(dhs: tf.Tensor):
            dz, partial, _ = tf.numpy_function(loops.backward, [keep, dhs, derivs, cell, recurrent],
                                               [tf.float32] * 3, stateful=False)
            dz = tf.reshape(dz, shape)
            d_recurrent = _weight_gradient(tf.reshape(h_prev, [-1, units]), tf.reshape(dz, [-1, 4 * units]))
            return tf.cast(dz, low), tf.reduce_sum(tf.reshape(partial, [-1, 4 * units]), axis=0), d_recurrent

        return hs, grad

    return run(xproj, bias, recurrent)


def _native_lstm(x: tf.Tensor, keep: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor, recurrent: tf.Tensor,
                 dropout: tf.Tensor | None = None) -> tf.Tensor:
    """`lstm_layer` with float32 products and the native loops doing the input products too: each step's
    x @ kernel is made in the loop, block by block, and the inputs' gradient in the backward loop, so the
    [T, B, 4u] projections never go to memory and the gate gradients are read once less. With `dropout`
    (`Dropout16.native_args`) the loops apply the layer's dropout to its output too."""
    units, width = recurrent.shape[0], kernel.shape[0]
    check_units(units)
    check_units(width)  # (the inputs' gradient is made in whole vectors too)
    loops = _native_kernels()

    @tf.custom_gradient
    def run(x, kernel, bias, recurrent):
        x, kernel, bias, recurrent = (tf.stop_gradient(v) for v in (x, kernel, bias, recurrent))
        shape = tf.shape(x)
        hs, h_prev, derivs, cell = tf.numpy_function(
            loops.forward, [x, keep, bias, recurrent, kernel, _or_none(None, tf.int32), _or_none(dropout)],
            [tf.float32] * 4, stateful=False)
        hs = tf.reshape(hs, tf.stack([shape[0], shape[1], units]))

        def grad(dhs: tf.Tensor):
            dz, partial, dx = tf.numpy_function(loops.backward,
                                                [keep, dhs, derivs, cell, recurrent, kernel, _or_none(dropout)],
                                                [tf.float32] * 3, stateful=False)
            # Both kernels' gradients from one product, which reads the gate gradients once: h_prev holds each
            # step's inputs and then its previous hidden states.
            both = _weight_gradient(tf.reshape(h_prev, [-1, width + units]), tf.reshape(dz, [-1, 4 * units]))
            return (tf.reshape(dx, shape), both[:width], tf.reduce_sum(tf.reshape(partial, [-1, 4 * units]), axis=0),
                    both[width:])

        return hs, grad

    return run(x, kernel, bias, recurrent)


def _native_event_lstm(ids: tf.Tensor, keep: tf.Tensor, table: tf.Tensor, bias: tf.Tensor, recurrent: tf.Tensor,
                       dropout: tf.Tensor | None = None) -> tf.Tensor:
    """The first layer's recurrent part with the native loops reading each step's input projection from
    `table` (embeddings @ kernel, [events, 4u]) by event id, instead of from a looked-up copy of it; the
    table's gradient is the per-event sum of the gate gradients. `dropout` as for `_native_lstm`."""
    units = recurrent.shape[0]
    check_units(units)
    loops = _native_kernels()

    @tf.custom_gradient
    def run(table, bias, recurrent):
        table, bias, recurrent = (tf.stop_gradient(v) for v in (table, bias, recurrent))
        no_kernel = _or_none(None, tf.float32)
        hs, h_prev, derivs, cell = tf.numpy_function(
            loops.forward, [table, keep, bias, recurrent, no_kernel, ids, _or_none(dropout)], [tf.float32] * 4,
            stateful=False)
        hs = tf.reshape(hs, tf.concat([tf.shape(ids), [units]], axis=0))

        def grad(dhs: tf.Tensor):
            dz, partial, _ = tf.numpy_function(
                loops.backward, [keep, dhs, derivs, cell, recurrent, no_kernel, _or_none(dropout)], [tf.float32] * 3,
                stateful=False)
            dz = tf.reshape(dz, [-1, 4 * units])
            return (_row_sums(dz, tf.reshape(ids, [-1]), table.shape[0]),
                    tf.reduce_sum(tf.reshape(partial, [-1, 4 * units]), axis=0),
                    _weight_gradient(tf.reshape(h_prev, [-1, units]), dz))

        return hs, grad

    return run(table, bias, recurrent)


def _recurrent_with(loops: str):
    """The recurrent part of a training layer for `loops` ("native" or "tensorflow")."""
    return _native_recurrent if loops == "native" else _recurrent


def fuses_dropout(input_width: int, matmul_dtype: str, loops: str) -> bool:
    """Whether a training layer with this input width (None: the first layer, fed event ids) runs its
    input products in the native loops, which then also take its dropout (`dropout=` of the layers)."""
    return loops == "native" and matmul_dtype == "float32" and (input_width or 0) % UNIT_MULTIPLE == 0


def lstm_layer(x: tf.Tensor, keep: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor, recurrent: tf.Tensor,
               matmul_dtype: str = "float32", loops: str = "tensorflow", dropout: tf.Tensor | None = None
               ) -> tf.Tensor:
    """One LSTM layer from zero state, time-major: inputs [T, B, in] -> hidden states [T, B, u], for training;
    `keep` [T, B] is 0 where a sequence starts (the state is reset there), else 1.

    The input projection of every step is one large matrix product before the loops, and its gradients
    (for the inputs and the kernel) two large products after them; these take `matmul_dtype` operands and
    give `matmul_dtype` results. Where `fuses_dropout`, the native loops make the projections and the
    inputs' gradient themselves (`_native_lstm`) and apply `dropout` (`Dropout16.native_args`) to the output.
    """
    low = tf.as_dtype(matmul_dtype)
    if fuses_dropout(kernel.shape[0], matmul_dtype, loops):
        return _native_lstm(x, keep, kernel, bias, recurrent, dropout)
    if dropout is not None:
        raise ValueError("only layers whose input products the native loops make take their dropout")
    shape = tf.shape(x)
    # The kernel knows the input width even when a relaxed trace has lost the input's static shape.
    flat = tf.cast(tf.reshape(x, [-1, kernel.shape[0]]), low)
    xproj = tf.reshape(_project(flat, tf.cast(kernel, low)), tf.stack([shape[0], shape[1], kernel.shape[1]]))
    return _recurrent_with(loops)(xproj, keep, bias, recurrent)


@_compiled
def _looked_up(table: tf.Tensor, ids: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    return tf.cast(tf.gather(table, ids), dtype)


@_compiled
def _row_sums(d: tf.Tensor, ids: tf.Tensor, rows: int) -> tf.Tensor:
    return tf.math.unsorted_segment_sum(tf.cast(d, tf.float32), ids, rows)


def _lookup(table: tf.Tensor, ids: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """table[ids] as `dtype`; its gradient is summed per table row in float32 (TensorFlow's own gradient of
    a lookup is a list of rows that the next product would turn dense in a slower, uncompiled pass)."""

    @tf.custom_gradient
    def run(table):
        return _looked_up(table, ids, dtype), lambda d: _row_sums(d, ids, table.shape[0])

    return run(table)


def event_lstm_layer(ids: tf.Tensor, keep: tf.Tensor, embeddings: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor,
                     recurrent: tf.Tensor, matmul_dtype: str = "float32", loops: str = "tensorflow",
                     dropout: tf.Tensor | None = None) -> tf.Tensor:
    """The first LSTM layer, fed by the event embedding, time-major: event ids [T, B] -> [T, B, u] (`keep` as
    for `lstm_layer`).

    A step's input is an embedding row, so its input projection is a row of embeddings @ kernel: the
    product is taken once for the 259 events and looked up. Its gradient is the per-event sum of the gate
    gradients, taken back through that small product: three large products over every step are saved.
    """
    if fuses_dropout(None, matmul_dtype, loops):
        return _native_event_lstm(ids, keep, tf.matmul(embeddings, kernel), bias, recurrent, dropout)
    if dropout is not None:
        raise ValueError("only layers whose input products the native loops make take their dropout")
    xproj = _lookup(tf.matmul(embeddings, kernel), ids, tf.as_dtype(matmul_dtype))
    return _recurrent_with(loops)(xproj, keep, bias, recurrent)


def lstm_time_major_inference(xproj: tf.Tensor, recurrent: tf.Tensor) -> tf.Tensor:
    """The same layer without keeping the gates for a backward pass (evaluation, export checks)."""
    return _join([_inference_loop(part, recurrent) for part in _row_groups(xproj)])


@_compiled
def _masked_loss(logits: tf.Tensor, labels: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Mean cross-entropy over the real positions, top-1 accuracy there, and the loss's gradient with respect
    to the logits, compiled as one program: TensorFlow's softmax cross-entropy kernel, its masking and a
    separate argmax each make their own passes over the [batch, time, 259] logits."""
    top = tf.reduce_max(logits, axis=-1, keepdims=True)
    shifted = logits - top
    exp = tf.exp(shifted)
    total = tf.reduce_sum(exp, axis=-1, keepdims=True)
    count = tf.reduce_sum(mask)
    picked = tf.gather(shifted, labels, batch_dims=len(labels.shape))
    loss = tf.reduce_sum((tf.math.log(total[..., 0]) - picked) * mask) / count
    hit = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels), tf.float32)
    dlogits = (exp / total - tf.one_hot(labels, tf.shape(logits)[-1])) * (mask / count)[..., None]
    return loss, tf.reduce_sum(hit * mask) / count, dlogits


def _native_output_loss(hidden: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor, labels: tf.Tensor, mask: tf.Tensor
                        ) -> tuple[tf.Tensor, tf.Tensor]:
    """`masked_loss` of the output layer's logits (hidden @ kernel + bias), computed by the native kernels
    (native.py, output_loss.cc) without the logits ever leaving the cache: hidden [T, B, u], labels and mask
    [T, B] (time-major, as the LSTM layers give their hidden states)."""
    kernels = _native_kernels()

    @tf.custom_gradient
    def run(hidden, kernel, bias):
        loss, accuracy, d_hidden, d_kernel, d_bias = tf.numpy_function(
            kernels.output_loss, [hidden, kernel, bias, labels, mask], [tf.float32] * 5, stateful=False)
        loss, accuracy = tf.reshape(loss, []), tf.reshape(accuracy, [])
        d_hidden = tf.reshape(d_hidden, tf.shape(hidden))

        def grad(dloss: tf.Tensor, daccuracy: tf.Tensor):
            return dloss * d_hidden, dloss * tf.reshape(d_kernel, tf.shape(kernel)), dloss * tf.reshape(d_bias, [-1])

        return (loss, accuracy), grad

    return run(hidden, kernel, bias)


def training_loss(model: keras.Model):
    """(event ids, labels, mask, keep: each [B, T]) -> (masked mean cross-entropy, accuracy) of `model` (from
    `build_model`) in training, differentiable with respect to its weights. `keep` is 0 where a sequence
    starts in the middle of a row (packed batches: the LSTM states are reset there) and 1 elsewhere.

    The network of `build_model` is run layer by layer so that its LSTM layers get `keep`. With the native
    loops the output layer and its loss are native too (`_native_output_loss`), fed the last LSTM layer's
    time-major hidden states, and the labels are made time-major instead."""
    layers = [(model.get_layer(f"lstm{i}"), model.get_layer(f"dropout{i}"))
              for i in range(sum(layer.name.startswith("lstm") for layer in model.layers))]
    dense = model.get_layer("dense")
    native = layers[0][0].loops == "native"

    def run(x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor, keep: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        hidden, keep = tf.transpose(x), tf.transpose(keep)
        for lstm, dropout in layers:
            if lstm.fuses_dropout():
                hidden = lstm(hidden, training=True, keep=keep, dropout=dropout.native_args())
            else:
                hidden = dropout(lstm(hidden, training=True, keep=keep), training=True)
        if native:
            return _native_output_loss(hidden, tf.convert_to_tensor(dense.kernel), tf.convert_to_tensor(dense.bias),
                                       tf.transpose(y), tf.transpose(mask))
        return masked_loss(dense(tf.transpose(hidden, [1, 0, 2])), y, mask)

    return run


def masked_loss(logits: tf.Tensor, labels: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(Mean next-event cross-entropy over the positions where `mask` is 1, top-1 accuracy there); the loss
    is differentiable with respect to the logits."""

    @tf.custom_gradient
    def run(logits):
        loss, accuracy, dlogits = _masked_loss(tf.stop_gradient(logits), labels, mask)
        return (loss, accuracy), lambda dloss, daccuracy: dloss * dlogits

    return run(logits)


@keras.saving.register_keras_serializable(package="chiptune_forge")
class Dropout16(keras.layers.Layer):
    """Dropout that draws 16 random bits per value where Keras's draws a 32-bit float: half the random-number
    work, which is most of what dropout costs in a training step here. The keep probability is resolved to
    a multiple of 1/65536 (0.5, the default, exactly) and kept values are scaled by the inverse of the
    resolved probability, so the expected output still equals the input. Where the layer before runs in
    the native loops, training hands them this layer's threshold and seed instead (`native_args`)."""

    def __init__(self, rate: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._threshold = min(65536, max(1, round((1.0 - rate) * 65536)))

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if not training or self._threshold == 65536:
            return inputs
        size = tf.size(inputs)
        bits = tf.random.stateless_uniform([(size + 1) // 2], self.seed_generator.next(), minval=None, maxval=None,
                                           dtype=tf.int32)
        halves = tf.reshape(tf.bitcast(bits, tf.uint16), [-1])[:size]
        keep = tf.reshape(halves < self._threshold, tf.shape(inputs))
        return tf.where(keep, inputs * (65536.0 / self._threshold), tf.zeros_like(inputs))

    def native_args(self) -> tf.Tensor | None:
        """This call's dropout for the native loops, or None where it keeps everything: [threshold, two
        32-bit words of the next seed] (the same draw from the seed generator as `call` makes, so that the
        generator's state, which checkpoints keep, moves on the same way)."""
        if self._threshold == 65536:
            return None
        seed = tf.cast(self.seed_generator.next(), tf.int64)
        words = tf.bitwise.bitwise_and(tf.stack([seed[0], seed[1] + tf.bitwise.right_shift(seed[0], 32)]),
                                       0xFFFFFFFF)
        return tf.concat([[tf.constant(self._threshold, tf.int64)], words], axis=0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def _keep_all(inputs: tf.Tensor, keep: tf.Tensor | None) -> tf.Tensor:
    """`keep`, or where none is given, ones: one sequence per row of time-major `inputs`."""
    return tf.ones(tf.shape(inputs)[:2]) if keep is None else keep


@keras.saving.register_keras_serializable(package="chiptune_forge")
class TimeMajorLSTM(keras.layers.Layer):
    """A Keras-layout LSTM layer over time-major input [T, B, in] -> [T, B, units], from zero state."""

    def __init__(self, units: int, matmul_dtype: str = "float32", loops: str = "tensorflow", **kwargs) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.matmul_dtype = matmul_dtype
        self.loops = loops

    def build(self, input_shape) -> None:
        u = self.units
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], 4 * u), initializer="glorot_uniform")
        self.recurrent_kernel = self.add_weight(name="recurrent_kernel", shape=(u, 4 * u), initializer="orthogonal")
        # Forget-gate bias starts at 1, as Keras's unit_forget_bias and the reference's forget_bias do.
        self.bias = self.add_weight(name="bias", shape=(4 * u,), initializer=keras.initializers.Constant(
            [0.0] * u + [1.0] * u + [0.0] * (2 * u)))

    def fuses_dropout(self) -> bool:
        """Whether training takes this layer's dropout into its native loops (`fuses_dropout`)."""
        return fuses_dropout(self.kernel.shape[0], self.matmul_dtype, self.loops)

    def _weight_tensors(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return tuple(tf.convert_to_tensor(w) for w in (self.kernel, self.bias, self.recurrent_kernel))

    def call(self, inputs: tf.Tensor, training: bool | None = None, keep: tf.Tensor | None = None,
             dropout: tf.Tensor | None = None) -> tf.Tensor:
        """`keep` (training only; [T, B], 0 where a sequence starts in the middle of a row) and `dropout`
        (training only, where `fuses_dropout`): see `lstm_layer`."""
        kernel, bias, recurrent = self._weight_tensors()
        if training:
            return lstm_layer(inputs, _keep_all(inputs, keep), kernel, bias, recurrent, self.matmul_dtype,
                              self.loops, dropout)
        shape = tf.shape(inputs)
        # The kernel knows the input width even when a relaxed trace has lost the input's static shape.
        flat = tf.reshape(inputs, [-1, self.kernel.shape[0]])
        xproj = tf.reshape(tf.matmul(flat, kernel) + bias, tf.stack([shape[0], shape[1], 4 * self.units]))
        return lstm_time_major_inference(xproj, recurrent)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units, "matmul_dtype": self.matmul_dtype, "loops": self.loops}


@keras.saving.register_keras_serializable(package="chiptune_forge")
class EventLSTM(TimeMajorLSTM):
    """The first LSTM layer with the event embedding it reads: time-major event ids [T, B] -> [T, B, units].

    It holds the embedding table (created first, so the network's weights keep the order of a separate
    embedding layer followed by an LSTM layer) because each step's input projection is then a row of one
    [259, 4u] product (`event_lstm_layer`)."""

    def __init__(self, units: int, embedding_dim: int, matmul_dtype: str = "float32", loops: str = "tensorflow",
                 **kwargs) -> None:
        super().__init__(units, matmul_dtype, loops, **kwargs)
        self.embedding_dim = embedding_dim

    def build(self, input_shape) -> None:
        # Keras's Embedding layer starts from the same uniform range.
        self.embeddings = self.add_weight(name="embeddings", shape=(NUM_CLASSES, self.embedding_dim),
                                          initializer="uniform")
        super().build((*input_shape, self.embedding_dim))

    def fuses_dropout(self) -> bool:
        return fuses_dropout(None, self.matmul_dtype, self.loops)

    def call(self, inputs: tf.Tensor, training: bool | None = None, keep: tf.Tensor | None = None,
             dropout: tf.Tensor | None = None) -> tf.Tensor:
        kernel, bias, recurrent = self._weight_tensors()
        embeddings = tf.convert_to_tensor(self.embeddings)
        if training:
            return event_lstm_layer(inputs, _keep_all(inputs, keep), embeddings, kernel, bias, recurrent,
                                    self.matmul_dtype, self.loops, dropout)
        return lstm_time_major_inference(tf.gather(tf.matmul(embeddings, kernel) + bias, inputs), recurrent)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.units)

    def get_config(self) -> dict:
        return {**super().get_config(), "embedding_dim": self.embedding_dim}


@keras.saving.register_keras_serializable(package="chiptune_forge")
class Logits(keras.layers.Dense):
    """keras.layers.Dense over [batch, time, in] as one product over all rows, whose kernel gradient is
    `_weight_gradient` (Dense's own takes TensorFlow's slower transposed product)."""

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(inputs)
        flat = tf.reshape(inputs, [-1, self.kernel.shape[0]])
        logits = tf.nn.bias_add(_project(flat, tf.convert_to_tensor(self.kernel)), self.bias)
        return tf.reshape(logits, tf.concat([shape[:-1], [self.units]], axis=0))


def build_model(hparams: HParams, matmul_dtype: str = "float32", loops: str = "tensorflow") -> keras.Model:
    """int32 event ids [batch, time] -> float32 logits [batch, time, 259].

    `loops` picks the recurrent loops of training ("native" needs native.load() to succeed and layer sizes
    that are multiples of native.UNIT_MULTIPLE; the trainer checks both); inference always uses XLA's.

    The first LSTM layer (`lstm0`) holds the event embedding. With `matmul_dtype` "bfloat16", the LSTM
    layers' large matrix products in training (the input projections and the weight gradients) take
    bfloat16 operands and give bfloat16 results (accumulating in float32), as mixed precision training
    does; the weights and their updates, the recurrent loops, the output layer and evaluation stay float32.
    """
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
    ids = keras.Input(shape=(None,), dtype="int32", name="events")
    x = keras.layers.Lambda(lambda t: tf.transpose(t), name="to_time_major")(ids)
    for i, units in enumerate(hparams.rnn_layer_sizes):
        layer = (EventLSTM(units, embedding_dim(hparams), matmul_dtype, loops, name="lstm0") if i == 0
                 else TimeMajorLSTM(units, matmul_dtype, loops, name=f"lstm{i}"))
        x = Dropout16(1.0 - hparams.dropout_keep_prob, name=f"dropout{i}")(layer(x))
    x = keras.layers.Lambda(lambda t: tf.transpose(t, [1, 0, 2]), name="to_batch_major")(x)
    logits = Logits(NUM_CLASSES, name="dense")(x)
    return keras.Model(ids, logits, name="polyphony_lstm")
