"""The polyphony network: event ids -> embedding -> stacked LSTM -> dropout -> 259 logits.

The embedding is `rnn_layer_sizes[0]` wide: the reference feeds the one-hot vector of each event, and an
embedding row is exactly that vector times a weight matrix, computed as a lookup.

The LSTM math is Keras's (gates i, f, c, o; sigmoid recurrent activation, tanh), with the same weight
layout as `keras.layers.LSTM` (kernel [in, 4u], recurrent kernel [u, 4u], bias [4u]), so the exported
weights drive any standard LSTM. Only the schedule differs, for speed on a CPU:
- the network runs time-major inside, and each layer's input projection for every timestep is one large
  matrix product before the recurrent loop, which then only multiplies the hidden state;
- the backward pass is written out by hand: the loop runs back through time computing the gate gradients,
  and the weight gradients are then two large matrix products over all timesteps instead of one small
  product accumulated per step.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from ..encoding import NUM_CLASSES  # noqa: E402
from ..hparams import HParams  # noqa: E402


def embedding_dim(hparams: HParams) -> int:
    """Width of the event embedding: the first LSTM layer's width."""
    return hparams.rnn_layer_sizes[0]


def _split_gates(z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    i, f, g, o = tf.split(z, 4, axis=-1)
    return tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)


@tf.custom_gradient
def lstm_time_major(xproj: tf.Tensor, recurrent: tf.Tensor):
    """Run one LSTM layer from zero state over time-major input projections [T, B, 4u] -> hidden [T, B, u]."""
    units = tf.shape(recurrent)[0]
    batch = tf.shape(xproj)[1]
    zeros = tf.zeros(tf.stack([batch, units]), dtype=xproj.dtype)
    zeros4 = tf.zeros(tf.stack([batch, 4 * units]), dtype=xproj.dtype)

    def step(carry, zx):
        h, c, _ = carry
        i, f, g, o = _split_gates(zx + tf.matmul(h, recurrent))
        c = f * c + i * g
        h = o * tf.tanh(c)
        return h, c, tf.concat([i, f, g, o], axis=-1)

    hs, cs, gates = tf.scan(step, xproj, initializer=(zeros, zeros, zeros4))

    def grad(dhs: tf.Tensor):
        h_prev = tf.concat([zeros[None], hs[:-1]], axis=0)
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

        _, _, dz = tf.scan(back, (dhs, gates, cs, c_prev), initializer=(zeros, zeros, zeros4), reverse=True)
        d_recurrent = tf.matmul(tf.reshape(h_prev, [-1, units]), tf.reshape(dz, [-1, 4 * units]), transpose_a=True)
        return dz, d_recurrent

    return hs, grad


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

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(inputs)
        flat = tf.reshape(inputs, [-1, inputs.shape[-1]])
        xproj = tf.reshape(tf.matmul(flat, self.kernel) + self.bias, tf.stack([shape[0], shape[1], 4 * self.units]))
        return lstm_time_major(xproj, tf.convert_to_tensor(self.recurrent_kernel))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units}


def build_model(hparams: HParams) -> keras.Model:
    """int32 event ids [batch, time] -> logits [batch, time, 259]."""
    ids = keras.Input(shape=(None,), dtype="int32", name="events")
    x = keras.layers.Lambda(lambda t: tf.transpose(t), name="to_time_major")(ids)
    x = keras.layers.Embedding(NUM_CLASSES, embedding_dim(hparams), name="embedding")(x)
    for i, units in enumerate(hparams.rnn_layer_sizes):
        x = TimeMajorLSTM(units, name=f"lstm{i}")(x)
        x = keras.layers.Dropout(1.0 - hparams.dropout_keep_prob, name=f"dropout{i}")(x)
    x = keras.layers.Lambda(lambda t: tf.transpose(t, [1, 0, 2]), name="to_batch_major")(x)
    logits = keras.layers.Dense(NUM_CLASSES, name="dense")(x)
    return keras.Model(ids, logits, name="polyphony_lstm")
