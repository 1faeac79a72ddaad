"""``finetune``: retrain a pruned or quantized model, its pruning masks held fixed.

ONNX graphs are interpreted as torch modules (``converter/onnx_torch.py``); Keras models train
in TensorFlow (``converter/keras_training.py``). Every weight that is exactly zero (what
``prune`` left) stays exactly zero: its gradient is cleared and it is re-zeroed after each step,
so the sparsity and the transfer-size gain of pruning survive. Trained with Adam on the training
data, early-stopped on a seeded validation split, and written back as the same kind of model.

Quantization-aware fine-tuning: an ONNX model quantized by ``quantize`` (QDQ) trains through
its own quantizers (fake-quantized int8 weights and activations, fixed scales) and is written
back as the same int8 graph with new integer weights; a Keras model with
``quantization_aware`` trains through int8 fake-quantized kernels, for a ``tflite`` int8 pass
after it. The report gives accuracy on the evaluation data before compression (the source),
before this pass (its input) and after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from converter import extras
from converter.model import ModelArtifact, ModelKind, load_keras
from converter.onnx_torch import onnx_module, sample_shape, write_weights
from converter.passes.base import Pass, PassOutput
from converter.runners import fit_inputs
from converter.training import FitResult, TrainingConfig, accuracy, fit, holds_pruning, training_data


class FinetuneConfig(TrainingConfig):
    epochs: int = Field(ge=1, description="Most training epochs (early stopping may end sooner).")
    quantization_aware: bool = Field(
        default=False,
        description="Keras: train through int8 fake-quantized kernels (per output channel, as TFLite "
        "int8 stores them) ahead of a tflite int8 pass. ONNX models quantized by `quantize` (QDQ) "
        "always train through their own quantizers; float ONNX models ignore it.",
    )


class FinetunePass(Pass[FinetuneConfig]):
    name = "finetune"
    config_class = FinetuneConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"onnx", "keras"})

    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        self.check_input(model)
        if model.kind == "keras":
            return self._run_keras(model, out_dir)
        return self._run_onnx(model, out_dir)

    def _eval_data(
        self, shape: tuple[int, ...]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None:
        data = self.context.data
        if data is None or np.asarray(data.y).ndim != 1:
            return None
        return fit_inputs(data.x, shape), np.asarray(data.y).astype(np.int64)

    def _run_onnx(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        torch = extras.torch()
        _, x, y = training_data(self.context.data, self.name)
        shape = sample_shape(model.path)
        x = fit_inputs(x, shape)
        module = onnx_module(model.path)
        zeros_before = {
            n: int((w.detach() == 0).sum()) if holds_pruning(w.detach().numpy()) else 0
            for n, w in module.named_weights().items()
        }
        masks = {
            f"weights.{i}": w.detach() != 0 for i, w in enumerate(module.weights) if bool((w == 0).any())
        }
        evaluation = self._eval_data(shape)
        before = accuracy(module, *evaluation) if evaluation is not None else None

        def loss(logits: Any, labels: Any, _batch: Any) -> Any:
            return torch.nn.functional.cross_entropy(logits.reshape(len(logits), -1), labels)

        result = fit(
            module, x, y, loss, self.config, self.config.epochs, self.name, self.context.on_epoch, masks
        )
        trained = module.export_weights()
        out = out_dir / f"{model.stem}-{'qat' if module.quantized else 'ft'}.onnx"
        write_weights(model.path, trained, out)
        after = accuracy(module, *evaluation) if evaluation is not None else None
        # A quantized weight's zeros are its zero point: count the values the integers stand for.
        values = {
            n: module.quantized[n].dequantize(a) if n in module.quantized else a for n, a in trained.items()
        }
        zeros_after = {n: int(np.count_nonzero(a == 0)) for n, a in values.items()}
        return self._output(
            ModelArtifact(out, "onnx"), result, before, after, zeros_before, zeros_after,
            {n: int(a.size) for n, a in trained.items()}, bool(module.quantized),
        )  # fmt: skip

    def _run_keras(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        from converter.keras_training import fit_keras, predict_keras

        _, x, y = training_data(self.context.data, self.name)
        net = load_keras(model.path)
        shape = tuple(int(d) for d in net.inputs[0].shape[1:])
        x = fit_inputs(x, shape)
        evaluation = self._eval_data(shape)

        def measure() -> float | None:
            if evaluation is None:
                return None
            return float(np.mean(predict_keras(net, evaluation[0]).argmax(1) == evaluation[1]))

        values = {v.path: np.asarray(v.numpy()) for v in net.trainable_variables if "float" in str(v.dtype)}
        zeros_before = {
            n: int(np.count_nonzero(a == 0)) if holds_pruning(a) else 0 for n, a in values.items()
        }
        before = measure()
        result = fit_keras(
            net, x, y, self.config, self.config.epochs, self.name, self.context.on_epoch,
            quantization_aware=self.config.quantization_aware,
        )  # fmt: skip
        after = measure()
        out = out_dir / f"{model.stem}-{'qat' if self.config.quantization_aware else 'ft'}.keras"
        net.save(str(out))
        trained = {v.path: np.asarray(v.numpy()) for v in net.trainable_variables if v.path in values}
        zeros_after = {n: int(np.count_nonzero(a == 0)) for n, a in trained.items()}
        sizes = {n: int(a.size) for n, a in trained.items()}
        return self._output(
            ModelArtifact(out, "keras"), result, before, after, zeros_before, zeros_after, sizes,
            self.config.quantization_aware,
        )  # fmt: skip

    def _output(
        self,
        model: ModelArtifact,
        result: FitResult,
        before: float | None,
        after: float | None,
        zeros_before: dict[str, int],
        zeros_after: dict[str, int],
        sizes: dict[str, int],
        quantization_aware: bool,
    ) -> PassOutput:
        baseline = self.context.baseline
        source = baseline.accuracy if baseline is not None else None
        if quantization_aware:
            chain = {"source": source, "before QAT": before, "after QAT": after}
        else:
            chain = {"before pruning": source, "after pruning": before, "after fine-tuning": after}
        masked = sorted(n for n, z in zeros_before.items() if z > 0)
        elements = sum(sizes[n] for n in masked)
        text = ", ".join(f"{k} {v:.2%}" for k, v in chain.items() if v is not None)
        kind = "quantization-aware, " if quantization_aware else ""
        return PassOutput(
            model=model,
            details={
                "accuracy": chain,
                "quantization_aware": quantization_aware,
                "history": result.history,
                "best_epoch": result.best_epoch,
                "best_val_accuracy": result.best_val_accuracy,
                "masked_tensors": masked,
                "zeros_before": zeros_before,
                "zeros_after": zeros_after,
            },
            sparsity=sum(zeros_after[n] for n in masked) / elements if elements else None,
            notes=f"{kind}{len(result.history)} epochs (best {result.best_epoch}), "
            f"zero weights kept at zero; top-1 {text}",
        )
