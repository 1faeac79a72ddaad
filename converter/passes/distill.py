"""``distill``: train a small torch student on a teacher's softened outputs, export it to ONNX.

The teacher is any model the converter can run (ONNX, TFLite, Keras, SavedModel, a torch.export
program saved as ``.pt2``). Its logits on
the training data are computed once and cached next to the artifacts (keyed by the teacher's and
the data's bytes), so epochs and reruns never invoke it again. The loss (Hinton et al. 2015) is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

with T = ``temperature``; T^2 keeps the soft term's gradients on the scale of the hard term's.
A teacher whose outputs are probabilities (rows >= 0 summing to 1) is read as log-probabilities.
The student is exported to ONNX, so prune, finetune, quantize and package follow as usual.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator, model_validator

from converter import extras
from converter.data import Dataset
from converter.errors import DataError
from converter.model import ModelArtifact, ModelKind, load_keras, load_onnx, load_torch_program
from converter.passes.base import EpochLog, Pass, PassOutput
from converter.runners import fit_inputs, open_runner
from converter.students import build_student, check_spec
from converter.training import TrainingConfig, accuracy, fit, parameter_count, split, training_data


class DistillConfig(TrainingConfig):
    student: str = Field(
        description="Student architecture: 'mlp:64', 'mlp:128,64' (hidden widths), 'cnn:small', or "
        "'package.module:factory' with factory(sample_shape, classes) -> torch module."
    )
    epochs: int = Field(
        default=100, ge=1, description="Most training epochs (early stopping may end sooner)."
    )
    temperature: float = Field(default=4.0, gt=0.0, description="Softening temperature T of both logit sets.")
    alpha: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description="Weight (0-1) of the soft-label KL term; 1 - alpha weighs hard-label CE.",
    )
    augment: Literal["none", "shift", "mixup"] = Field(
        default="none",
        description="Extra transfer samples the teacher labels (the validation split never gets any): "
        "'shift': the training images moved one pixel in each of the 8 directions (zero fill; needs "
        "image samples (H, W) or (H, W, C)), also hard-labelled with the image's label; 'mixup': "
        "`mixup_copies` x the training set of random blends l*a + (1-l)*b of two training samples "
        "(l uniform in 0-1), soft labels only.",
    )
    mixup_copies: int = Field(
        default=8, ge=1, description="augment='mixup': blended samples per training sample."
    )
    learning_rate: float = Field(default=3e-3, gt=0.0, description="Adam learning rate.")
    patience: int = Field(
        default=15, ge=1, description="Stop after this many epochs without a better validation accuracy."
    )

    @field_validator("student")
    @classmethod
    def _known_student(cls, value: str) -> str:
        return check_spec(value)

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.augment != "mixup" and "mixup_copies" in self.model_fields_set:
            raise ValueError("mixup_copies applies to augment='mixup' only")
        return self


def shifted_copies(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The images ``x`` (N, H, W[, C]) moved one pixel in each of 8 directions, zero-filled: (8N, ...)."""
    if x.ndim not in (3, 4):
        raise DataError(
            f"augment='shift' moves images: training samples must be (H, W) or (H, W, C), "
            f"not {list(x.shape[1:])}"
        )
    height, width = x.shape[1], x.shape[2]
    pad = [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 3)
    padded = np.pad(x, pad)
    copies = [
        padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dy, dx) != (0, 0)
    ]
    return np.ascontiguousarray(np.concatenate(copies), dtype=np.float32)


def mixup_samples(x: npt.NDArray[np.float32], copies: int, seed: int) -> npt.NDArray[np.float32]:
    """``copies * len(x)`` seeded blends l*a + (1-l)*b of random pairs of ``x``, l uniform in [0, 1]."""
    rng = np.random.default_rng(seed)
    n = copies * len(x)
    first, second = rng.integers(0, len(x), n), rng.integers(0, len(x), n)
    blend = rng.uniform(0.0, 1.0, n).astype(np.float32).reshape((n,) + (1,) * (x.ndim - 1))
    return np.ascontiguousarray(blend * x[first] + (1.0 - blend) * x[second], dtype=np.float32)


def _log_probs_if_probabilities(out: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    if out.min() >= 0.0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.clip(out, 1e-12, None)).astype(np.float32)
    return out


def teacher_logits(
    teacher: ModelArtifact, x: npt.NDArray[np.float32], cache_dir: Path
) -> npt.NDArray[np.float32]:
    """The teacher's (N, classes) outputs on ``x``, from the cache when teacher and data are unchanged."""
    digest = hashlib.sha256(teacher.read_bytes() + x.tobytes() + str(x.shape).encode()).hexdigest()[:16]
    cache = cache_dir / f"{teacher.stem}-teacher-logits-{digest}.npy"
    if cache.is_file():
        return np.asarray(np.load(cache), dtype=np.float32)
    runner = open_runner(teacher)
    out = runner.predict(fit_inputs(x, runner.sample_shape))
    logits = _log_probs_if_probabilities(out.reshape(len(out), -1))
    np.save(cache, logits)
    return logits


def teacher_parameters(teacher: ModelArtifact) -> int | None:
    """Weights of the teacher (ONNX initializers, torch program state, Keras weights); None for TFLite."""
    if teacher.kind == "onnx":
        from onnx import numpy_helper

        return sum(int(numpy_helper.to_array(i).size) for i in load_onnx(teacher.path).graph.initializer)
    if teacher.kind == "torch":
        return sum(int(v.numel()) for v in load_torch_program(teacher.path).state_dict.values())
    if teacher.kind == "keras":
        return int(load_keras(teacher.path).count_params())
    return None


def compare(teacher: int, student: int, less: str, more: str) -> str:
    """How the student compares with the teacher, e.g. '2.0x fewer' or '2.0x more' (never '0.5x fewer')."""
    if student <= teacher:
        return f"{teacher / student:.1f}x {less}"
    return f"{student / teacher:.1f}x {more}"


def distill(
    teacher: ModelArtifact,
    student: Any,
    data: Dataset,
    config: DistillConfig,
    out: Path,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> tuple[ModelArtifact, dict[str, Any]]:
    """Train the torch module ``student`` from ``teacher`` on ``data``'s training split; export to ``out``.

    ``student`` takes batches shaped like ``data.train_x``. Returns the ONNX student and what the
    report shows (teacher and student parameters, sizes, accuracies on the evaluation data, history).
    """
    from converter.api import export_torch

    torch = extras.torch()
    functional = torch.nn.functional
    data, x, y = training_data(data, "distill")
    train_rows, val_rows = split(len(x), config.val_fraction, config.seed)
    original = len(x)
    if config.augment != "none":
        if config.augment == "shift":
            extra = shifted_copies(x[train_rows])
            extra_y = np.tile(y[train_rows], len(extra) // len(train_rows))
        else:  # a blend has no hard label: -1 leaves it out of the cross-entropy term
            extra = mixup_samples(x[train_rows], config.mixup_copies, config.seed)
            extra_y = np.full(len(extra), -1, dtype=np.int64)
        x, y = np.concatenate([x, extra]), np.concatenate([y, extra_y])
        train_rows = np.concatenate([train_rows, np.arange(original, len(x))])
    soft = torch.from_numpy(teacher_logits(teacher, x, out.parent))
    temperature, alpha = config.temperature, config.alpha

    def loss(logits: Any, labels: Any, batch: Any) -> Any:
        # Mean over the batch, samples without a hard label (-1, mixup blends) adding zero.
        hard = functional.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / len(labels)
        kl = functional.kl_div(
            functional.log_softmax(logits / temperature, dim=1),
            functional.log_softmax(soft[batch] / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        return alpha * temperature**2 * kl + (1.0 - alpha) * hard

    result = fit(student, x, y, loss, config, config.epochs, "distill", on_epoch, rows=(train_rows, val_rows))
    artifact = export_torch(student, torch.from_numpy(x[:2]), out)
    eval_y = np.asarray(data.y).reshape(-1).astype(np.int64)
    teacher_runner = open_runner(teacher)
    teacher_out = teacher_runner.predict(fit_inputs(data.x, teacher_runner.sample_shape))
    details = {
        "teacher": {
            "artifact": teacher.path.name,
            "kind": teacher.kind,
            "parameters": teacher_parameters(teacher),
            "size_bytes": teacher.size_bytes(),
            "accuracy": float(np.mean(teacher_out.reshape(len(teacher_out), -1).argmax(1) == eval_y)),
        },
        "student": {
            "artifact": out.name,
            "architecture": config.student,
            "parameters": parameter_count(student),
            "size_bytes": artifact.size_bytes(),
            "accuracy": accuracy(student, fit_inputs(data.x, tuple(x.shape[1:])), eval_y),
        },
        "temperature": temperature,
        "alpha": alpha,
        "augment": config.augment,
        "transfer_samples": len(train_rows),
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
    }
    return artifact, details


class DistillPass(Pass[DistillConfig]):
    name = "distill"
    config_class = DistillConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"onnx", "tflite", "keras", "savedmodel", "torch"})
    produces: ClassVar[ModelKind | None] = "onnx"

    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        self.check_input(model)
        torch = extras.torch()
        data, x, _ = training_data(self.context.data, self.name)
        classes = teacher_logits(model, x, out_dir).shape[1]
        torch.manual_seed(self.config.seed)
        try:
            student = build_student(self.config.student, tuple(x.shape[1:]), classes)
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        tag = self.config.student.replace(":", "-").replace(",", "-")
        out = out_dir / f"{model.stem}-student-{tag}.onnx"
        artifact, details = distill(model, student, data, self.config, out, self.context.on_epoch)
        t, s = details["teacher"], details["student"]
        ratio = (
            f"{compare(t['parameters'], s['parameters'], 'fewer', 'more')} parameters, "
            if t["parameters"]
            else ""
        )
        return PassOutput(
            model=artifact,
            details=details,
            notes=f"student {self.config.student}: {s['parameters']:,} parameters ({ratio}"
            f"{compare(t['size_bytes'], s['size_bytes'], 'smaller', 'larger')} file); "
            f"top-1 teacher {t['accuracy']:.2%}, "
            f"student {s['accuracy']:.2%}; T={self.config.temperature}, alpha={self.config.alpha}",
        )
