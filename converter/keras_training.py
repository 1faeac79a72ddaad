"""The ``finetune`` loop for Keras models: masks held at zero, early stopping, optional fake-quant.

Same rules as the torch loop (``converter/training.py``): Adam, a seeded validation split, the
best validation epoch's weights kept, weights that are exactly zero (what ``prune`` left) held
at zero. With ``quantization_aware``, every kernel (a trainable weight with two or more
dimensions) is fake-quantized the way the TFLite int8 converter quantizes it (symmetric int8,
one scale per output channel, the last axis) for the forward and backward pass, and the
gradient is applied to the float kernel (straight-through estimator). The kernels are swapped
for their quantized values around each step rather than by rewriting the model, so any Keras
model trains this way; activations are not fake-quantized (the converter calibrates them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from converter import extras
from converter.passes.base import EpochLog
from converter.training import EarlyStopping, FitResult, TrainingConfig, holds_pruning, scores, split


def fake_quantize_kernel(kernel: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``kernel`` rounded to symmetric int8 levels, one scale per output channel (last axis)."""
    flat = np.abs(kernel).reshape(-1, kernel.shape[-1])
    scale = flat.max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.asarray(np.clip(np.round(kernel / scale), -127, 127) * scale, dtype=np.float32)


def _outputs_are_probabilities(net: Any, x: npt.NDArray[np.float32]) -> bool:
    out = np.asarray(net(x[:32], training=False))
    return bool(out.min() >= 0.0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))


def predict_keras(net: Any, x: npt.NDArray[np.float32], batch: int = 256) -> npt.NDArray[np.float32]:
    """``net``'s outputs on ``x`` in inference mode, as float32 numpy (N, classes)."""
    out = [np.asarray(net(x[i : i + batch], training=False)) for i in range(0, len(x), batch)]
    return np.concatenate(out).reshape(len(x), -1).astype(np.float32)


def fit_keras(
    net: Any,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    config: TrainingConfig,
    epochs: int,
    pass_name: str,
    on_epoch: Callable[[EpochLog], None] | None = None,
    quantization_aware: bool = False,
) -> FitResult:
    """Train the Keras model ``net`` in place; leave it holding the best validation epoch's weights.

    Every trainable float weight that has zeros keeps exactly those zeros.
    """
    tf = extras.tensorflow()
    keras = extras.require("keras")
    keras.utils.set_random_seed(config.seed)
    train_idx, val_idx = split(len(x), config.val_fraction, config.seed)
    variables = [v for v in net.trainable_variables if "float" in str(v.dtype)]
    masks = {id(v): np.asarray(v.numpy()) != 0 for v in variables if holds_pruning(np.asarray(v.numpy()))}
    kernels = [v for v in variables if len(v.shape) >= 2] if quantization_aware else []
    probabilities = _outputs_are_probabilities(net, x)
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
    optimizer = keras.optimizers.Adam(config.learning_rate)
    rng = np.random.default_rng(config.seed)
    stopping = EarlyStopping(config, epochs, pass_name, on_epoch)
    best_weights = net.get_weights()

    def quantized_kernels() -> list[npt.NDArray[np.float32]]:
        """Swap every kernel for its fake-quantized value; returns the float values to put back."""
        saved = [np.asarray(v.numpy()) for v in kernels]
        for v, w in zip(kernels, saved, strict=True):
            v.assign(fake_quantize_kernel(w))
        return saved

    def restore(saved: list[npt.NDArray[np.float32]]) -> None:
        for v, w in zip(kernels, saved, strict=True):
            v.assign(w)

    for epoch in range(1, epochs + 1):
        total = 0.0
        order = train_idx[rng.permutation(len(train_idx))]
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            saved = quantized_kernels()
            with tf.GradientTape() as tape:
                loss = loss_object(y[batch], net(x[batch], training=True))
            gradients = tape.gradient(loss, variables)
            restore(saved)  # straight-through: the quantized weights' gradient updates the float ones
            gradients = [
                g * masks[id(v)] if id(v) in masks and g is not None else g
                for g, v in zip(gradients, variables, strict=True)
            ]
            optimizer.apply_gradients(zip(gradients, variables, strict=True))
            for v in variables:
                if id(v) in masks:
                    v.assign(np.where(masks[id(v)], v.numpy(), 0.0).astype(np.float32))
            total += float(loss) * len(batch)
        saved = quantized_kernels()
        val_out = predict_keras(net, x[val_idx])
        restore(saved)
        if probabilities:
            val_out = np.log(np.clip(val_out, 1e-12, None))
        val_accuracy, val_loss = scores(val_out, y[val_idx])
        best, stop = stopping.update(epoch, total / len(order), val_accuracy, val_loss)
        if best:
            best_weights = net.get_weights()
        if stop:
            break
    net.set_weights(best_weights)
    return stopping.result
