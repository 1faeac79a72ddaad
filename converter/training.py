"""The training loop the ``finetune`` and ``distill`` passes share: seeded, with early stopping.

A validation split (``val_fraction`` of the training data, chosen by ``seed``) is held out;
after every epoch the validation top-1 accuracy is measured, the best epoch's weights are kept,
and training stops after ``patience`` epochs without improvement. Same seed, same data, same
threads: same weights (torch on CPU is deterministic for these operators).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from converter import extras
from converter.data import Dataset
from converter.errors import DataError
from converter.passes.base import EpochLog, PassConfig


class TrainingConfig(PassConfig):
    """Fields every training pass has."""

    learning_rate: float = Field(default=1e-3, gt=0.0, description="Adam learning rate.")
    batch_size: int = Field(default=64, ge=1, description="Training samples per optimizer step.")
    patience: int = Field(
        default=8, ge=1, description="Stop after this many epochs without a better validation accuracy."
    )
    val_fraction: float = Field(
        default=0.15,
        gt=0.0,
        lt=1.0,
        description="Fraction (0-1) of the training data held out for validation.",
    )
    seed: int = Field(default=0, description="Seeds the validation split, the shuffling and new weights.")


@dataclass
class FitResult:
    """What training did: per-epoch history, the best epoch (1-based) and its validation accuracy."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0


#: loss(logits, labels, batch indices into the training split) -> scalar tensor.
LossFn = Callable[[Any, Any, Any], Any]


def training_data(
    data: Dataset | None, pass_name: str
) -> tuple[Dataset, npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The data set, its training inputs and integer labels; :class:`DataError` when there are none."""
    if data is None or data.train_x is None or data.train_y is None:
        raise DataError(f"{pass_name} needs training data: give --train FILE.npz or --dataset digits")
    if np.asarray(data.train_y).dtype.kind not in "iu":
        raise DataError(f"{pass_name} trains classifiers: training 'y' must hold integer class ids")
    return data, data.train_x, np.asarray(data.train_y).reshape(-1).astype(np.int64)


def holds_pruning(array: npt.NDArray[Any]) -> bool:
    """True when the zeros of a weight tensor are a pruning mask to keep.

    Kernels (2+ dims) with any zero; 1-D tensors (biases, norm scales) only when mostly zero, so
    that a bias that merely starts at zero (Keras initialises them so) still trains.
    """
    zeros = int(np.count_nonzero(array == 0))
    return zeros > 0 and (array.ndim >= 2 or zeros > array.size // 2)


def split(n: int, val_fraction: float, seed: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Seeded (train, validation) index arrays over ``n`` samples."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def predict(module: Any, x: npt.NDArray[np.float32], batch: int = 512) -> npt.NDArray[np.float32]:
    """``module``'s outputs on ``x`` in eval mode, as float32 numpy."""
    torch = extras.torch()
    module.eval()
    with torch.no_grad():
        out = [module(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out).astype(np.float32)


def accuracy(module: Any, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> float:
    """Top-1 accuracy (0-1) of ``module`` on ``x``, ``y``."""
    return float(np.mean(predict(module, x).reshape(len(x), -1).argmax(1) == y))


def scores(logits: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> tuple[float, float]:
    """Top-1 accuracy (0-1) and mean hard-label cross-entropy of ``logits`` (N, classes) for ``y``."""
    logits = logits.reshape(len(y), -1).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(np.mean(logits.argmax(1) == y)), float(-log_probs[np.arange(len(y)), y].mean())


class EarlyStopping:
    """Keeps the history, says when an epoch is the best so far and when to stop.

    Best = highest validation top-1; a small validation split often ties on accuracy, so the
    lower cross-entropy breaks the tie. Stop after ``patience`` epochs without a new best.
    """

    def __init__(
        self, config: TrainingConfig, epochs: int, pass_name: str, on_epoch: Callable[[EpochLog], None] | None
    ) -> None:
        self.config, self.epochs, self.pass_name, self.on_epoch = config, epochs, pass_name, on_epoch
        self.result = FitResult(best_val_accuracy=-1.0)
        self._best_loss = float("inf")

    def update(self, epoch: int, loss: float, val_accuracy: float, val_loss: float) -> tuple[bool, bool]:
        """Record an epoch; returns (it is the best so far, training should stop now)."""
        result = self.result
        result.history.append(
            {"epoch": epoch, "loss": loss, "val_accuracy": val_accuracy, "val_loss": val_loss}
        )
        if self.on_epoch is not None:
            self.on_epoch(EpochLog(self.pass_name, epoch, self.epochs, loss, val_accuracy))
        if (val_accuracy, -val_loss) > (result.best_val_accuracy, -self._best_loss):
            result.best_epoch, result.best_val_accuracy, self._best_loss = epoch, val_accuracy, val_loss
            return True, False
        return False, epoch - result.best_epoch >= self.config.patience


def fit(
    module: Any,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    loss_fn: LossFn,
    config: TrainingConfig,
    epochs: int,
    pass_name: str,
    on_epoch: Callable[[EpochLog], None] | None = None,
    masks: dict[str, Any] | None = None,
    rows: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None,
) -> FitResult:
    """Train ``module`` in place with Adam; leave it holding the best validation epoch's weights.

    ``masks`` maps parameter name -> bool tensor of weights allowed to change; the others are
    held at exactly zero (their gradients are cleared and they are re-zeroed after every step).
    ``rows`` = (training rows, validation rows) of ``x``; default: :func:`split` of all of ``x``.
    """
    torch = extras.torch()
    torch.manual_seed(config.seed)
    train_idx, val_idx = rows if rows is not None else split(len(x), config.val_fraction, config.seed)
    val_x, val_y = x[val_idx], y[val_idx]
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    params = dict(module.named_parameters())
    masked = [(params[name], mask) for name, mask in (masks or {}).items()]
    optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.from_numpy(train_idx)
    stopping = EarlyStopping(config, epochs, pass_name, on_epoch)
    best_state: dict[str, Any] = {}
    for epoch in range(1, epochs + 1):
        module.train()
        total, count = 0.0, 0
        for batch in order[torch.randperm(len(order), generator=generator)].split(config.batch_size):
            optimizer.zero_grad()
            loss = loss_fn(module(xt[batch]), yt[batch], batch)
            loss.backward()
            for param, mask in masked:
                param.grad.mul_(mask)
            optimizer.step()
            with torch.no_grad():
                for param, mask in masked:
                    param.masked_fill_(~mask, 0.0)
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        val_accuracy, val_loss = scores(predict(module, val_x), val_y)
        best, stop = stopping.update(epoch, total / count, val_accuracy, val_loss)
        if best:
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if stop:
            break
    module.load_state_dict(best_state)
    module.eval()
    return stopping.result


def parameter_count(module: Any) -> int:
    """Number of trainable scalars of a torch module."""
    return int(sum(p.numel() for p in module.parameters()))
