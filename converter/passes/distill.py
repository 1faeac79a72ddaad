"""``distill``: train a small torch student on a teacher's softened outputs, export it to ONNX.

The teacher is any model the converter can run (ONNX, TFLite, Keras, SavedModel). Its logits on
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
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from converter import extras
from converter.data import Dataset
from converter.errors import DataError
from converter.model import ModelArtifact, ModelKind, load_onnx
from converter.passes.base import EpochLog, Pass, PassOutput
from converter.runners import fit_inputs, open_runner
from converter.students import build_student, check_spec
from converter.training import TrainingConfig, accuracy, fit, parameter_count, training_data


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
    learning_rate: float = Field(default=3e-3, gt=0.0, description="Adam learning rate.")
    patience: int = Field(
        default=15, ge=1, description="Stop after this many epochs without a better validation accuracy."
    )

    @field_validator("student")
    @classmethod
    def _known_student(cls, value: str) -> str:
        return check_spec(value)


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


def _onnx_parameters(teacher: ModelArtifact) -> int | None:
    if teacher.kind != "onnx":
        return None
    from onnx import numpy_helper

    return sum(int(numpy_helper.to_array(i).size) for i in load_onnx(teacher.path).graph.initializer)


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
    soft = torch.from_numpy(teacher_logits(teacher, x, out.parent))
    temperature, alpha = config.temperature, config.alpha

    def loss(logits: Any, labels: Any, batch: Any) -> Any:
        hard = functional.cross_entropy(logits, labels)
        kl = functional.kl_div(
            functional.log_softmax(logits / temperature, dim=1),
            functional.log_softmax(soft[batch] / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        return alpha * temperature**2 * kl + (1.0 - alpha) * hard

    result = fit(student, x, y, loss, config, config.epochs, "distill", on_epoch)
    artifact = export_torch(student, torch.from_numpy(x[:2]), out)
    eval_y = np.asarray(data.y).reshape(-1).astype(np.int64)
    teacher_runner = open_runner(teacher)
    teacher_out = teacher_runner.predict(fit_inputs(data.x, teacher_runner.sample_shape))
    details = {
        "teacher": {
            "artifact": teacher.path.name,
            "kind": teacher.kind,
            "parameters": _onnx_parameters(teacher),
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
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
    }
    return artifact, details


class DistillPass(Pass[DistillConfig]):
    name = "distill"
    config_class = DistillConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"onnx", "tflite", "keras", "savedmodel"})
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
        ratio = f"{t['parameters'] / s['parameters']:.1f}x fewer parameters, " if t["parameters"] else ""
        return PassOutput(
            model=artifact,
            details=details,
            notes=f"student {self.config.student}: {s['parameters']:,} parameters ({ratio}"
            f"{t['size_bytes'] / s['size_bytes']:.1f}x smaller file); top-1 teacher {t['accuracy']:.2%}, "
            f"student {s['accuracy']:.2%}; T={self.config.temperature}, alpha={self.config.alpha}",
        )
