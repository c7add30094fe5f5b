"""The polyphony network: event ids -> embedding -> stacked LSTM -> dropout -> 259 logits.

The embedding is `rnn_layer_sizes[0]` wide: the reference feeds the one-hot vector of each event, and an
embedding row is exactly that vector times a weight matrix, computed as a lookup.

The LSTM math is Keras's (gates i, f, c, o; sigmoid recurrent activation, tanh), with the same weight
layout as `keras.layers.LSTM` (kernel [in, 4u], recurrent kernel [u, 4u], bias [4u]), so the exported
weights drive any standard LSTM. Only the schedule differs, for speed on a CPU:
- the network runs time-major inside, and each layer's input projection for every timestep is one large
  matrix product before the recurrent loop, which then only multiplies the hidden state;
- the recurrent loops are compiled with XLA, and the rows of a batch are split into independent groups
  whose loops run at the same time on different cores (a loop alone keeps only one core busy);
- the backward pass is written out by hand: the loop runs back through time computing the gate gradients,
  and the weight gradients are then large matrix products over all timesteps instead of one small product
  accumulated per step.
"""

from __future__ import annotations

import os

from ..encoding import NUM_CLASSES
from ..hparams import HParams
from .framework import keras, tf

LOOP_GROUPS = max(1, min(4, os.cpu_count() or 1))
_compiled = tf.function(jit_compile=True, reduce_retracing=True)


def embedding_dim(hparams: HParams) -> int:
    """Width of the event embedding: the first LSTM layer's width."""
    return hparams.rnn_layer_sizes[0]


def _split_gates(z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    i, f, g, o = tf.split(z, 4, axis=-1)
    return tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)


def _zeros(like: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    return tf.zeros(tf.stack([tf.shape(like)[1], width]), dtype=like.dtype)


@_compiled
def _forward_loop(xproj: tf.Tensor, recurrent: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Hidden states, cell states and gate activations [T, B, *] of one layer from zero state."""
    units = tf.shape(recurrent)[0]
    zeros = _zeros(xproj, units)

    def step(carry, zx):
        h, c, _ = carry
        i, f, g, o = _split_gates(zx + tf.matmul(h, recurrent))
        c = f * c + i * g
        return o * tf.tanh(c), c, tf.concat([i, f, g, o], axis=-1)

    return tf.scan(step, xproj, initializer=(zeros, zeros, _zeros(xproj, 4 * units)))


@_compiled
def _backward_loop(dhs: tf.Tensor, gates: tf.Tensor, cs: tf.Tensor, recurrent: tf.Tensor) -> tf.Tensor:
    """Gradients of the gate pre-activations [T, B, 4u] given the gradients of the hidden states."""
    units = tf.shape(recurrent)[0]
    zeros = _zeros(dhs, units)
    c_prev = tf.concat([zeros[None], cs[:-1]], axis=0)
    recurrent_t = tf.transpose(recurrent)

    def back(carry, elems):
        dh_next, dc_next, _ = carry
        dh_out, gate, c, cp = elems
        i, f, g, o = tf.split(gate, 4, axis=-1)
        dh = dh_out + dh_next
        tc = tf.tanh(c)
        dc = dc_next + dh * o * (1.0 - tc * tc)
        dz = tf.concat([dc * g * i * (1.0 - i), dc * cp * f * (1.0 - f), dc * i * (1.0 - g * g),
                        dh * tc * o * (1.0 - o)], axis=-1)
        return tf.matmul(dz, recurrent_t), dc * f, dz

    _, _, dz = tf.scan(back, (dhs, gates, cs, c_prev), initializer=(zeros, zeros, _zeros(dhs, 4 * units)),
                       reverse=True)
    return dz


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


def lstm_time_major(xproj: tf.Tensor, recurrent: tf.Tensor) -> tf.Tensor:
    """One LSTM layer from zero state, time-major: input projections [T, B, 4u] -> hidden states [T, B, u].

    Differentiable through a hand-written backward pass.
    """

    @tf.custom_gradient
    def run(xproj, recurrent):
        # The loops are differentiated by `grad` below, never by tracing through them.
        xproj, recurrent = tf.stop_gradient(xproj), tf.stop_gradient(recurrent)
        outs = [_forward_loop(part, recurrent) for part in _row_groups(xproj)]
        hs = _join([o[0] for o in outs])

        def grad(dhs: tf.Tensor):
            dz = _join([_backward_loop(d, o[2], o[1], recurrent) for d, o in zip(_row_groups(dhs), outs, strict=True)])
            units = tf.shape(recurrent)[0]
            h_prev = tf.concat([tf.zeros_like(hs[:1]), hs[:-1]], axis=0)
            d_recurrent = tf.matmul(tf.reshape(h_prev, [-1, units]), tf.reshape(dz, [-1, 4 * units]),
                                    transpose_a=True)
            return dz, d_recurrent

        return hs, grad

    return run(xproj, recurrent)


def lstm_time_major_inference(xproj: tf.Tensor, recurrent: tf.Tensor) -> tf.Tensor:
    """The same layer without keeping the gates for a backward pass (evaluation, export checks)."""
    return _join([_inference_loop(part, recurrent) for part in _row_groups(xproj)])


@keras.saving.register_keras_serializable(package="chiptune_forge")
class TimeMajorLSTM(keras.layers.Layer):
    """A Keras-layout LSTM layer over time-major input [T, B, in] -> [T, B, units], from zero state."""

    def __init__(self, units: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape) -> None:
        u = self.units
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], 4 * u), initializer="glorot_uniform")
        self.recurrent_kernel = self.add_weight(name="recurrent_kernel", shape=(u, 4 * u), initializer="orthogonal")
        # Forget-gate bias starts at 1, as Keras's unit_forget_bias and the reference's forget_bias do.
        self.bias = self.add_weight(name="bias", shape=(4 * u,), initializer=keras.initializers.Constant(
            [0.0] * u + [1.0] * u + [0.0] * (2 * u)))

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        shape = tf.shape(inputs)
        # The kernel knows the input width even when a relaxed trace has lost the input's static shape.
        flat = tf.reshape(inputs, [-1, self.kernel.shape[0]])
        xproj = tf.reshape(tf.matmul(flat, self.kernel) + self.bias, tf.stack([shape[0], shape[1], 4 * self.units]))
        recurrent = tf.convert_to_tensor(self.recurrent_kernel)
        if training:
            return lstm_time_major(xproj, recurrent)
        return lstm_time_major_inference(xproj, recurrent)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units}


def build_model(hparams: HParams) -> keras.Model:
    """int32 event ids [batch, time] -> float32 logits [batch, time, 259]."""
    ids = keras.Input(shape=(None,), dtype="int32", name="events")
    x = keras.layers.Lambda(lambda t: tf.transpose(t), name="to_time_major")(ids)
    x = keras.layers.Embedding(NUM_CLASSES, embedding_dim(hparams), name="embedding")(x)
    for i, units in enumerate(hparams.rnn_layer_sizes):
        x = TimeMajorLSTM(units, name=f"lstm{i}")(x)
        x = keras.layers.Dropout(1.0 - hparams.dropout_keep_prob, name=f"dropout{i}")(x)
    x = keras.layers.Lambda(lambda t: tf.transpose(t, [1, 0, 2]), name="to_batch_major")(x)
    logits = keras.layers.Dense(NUM_CLASSES, name="dense")(x)
    return keras.Model(ids, logits, name="polyphony_lstm")
