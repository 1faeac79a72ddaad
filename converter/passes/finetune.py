"""``finetune``: retrain a pruned ONNX model with its pruning masks held fixed.

The ONNX graph is interpreted as a torch module (``converter/onnx_torch.py``); every float
tensor that has zeros (what ``prune`` left) keeps exactly those zeros: their gradients are
cleared and they are re-zeroed after each step, so the sparsity and the transfer-size gain of
pruning survive. Trained with Adam on the training data, early-stopped on a seeded validation
split, and written back into the same graph. The report gives accuracy before pruning (the
source model), after pruning (this pass's input) and after fine-tuning, all on the evaluation data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from converter import extras
from converter.model import ModelArtifact, ModelKind
from converter.onnx_torch import onnx_module, sample_shape, write_weights
from converter.passes.base import Pass, PassOutput
from converter.runners import fit_inputs
from converter.training import TrainingConfig, accuracy, fit, training_data


class FinetuneConfig(TrainingConfig):
    epochs: int = Field(ge=1, description="Most training epochs (early stopping may end sooner).")


class FinetunePass(Pass[FinetuneConfig]):
    name = "finetune"
    config_class = FinetuneConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"onnx"})

    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        self.check_input(model)
        torch = extras.torch()
        data, x, y = training_data(self.context.data, self.name)
        shape = sample_shape(model.path)
        x = fit_inputs(x, shape)
        module = onnx_module(model.path)
        weights = module.named_weights()
        masks = {
            f"weights.{i}": w.detach() != 0
            for i, w in enumerate(module.weights)
            if bool((w.detach() == 0).any())
        }
        zeros_before = {n: int((w.detach() == 0).sum()) for n, w in weights.items()}
        eval_x, eval_y = None, None
        if np.asarray(data.y).ndim == 1:
            eval_x, eval_y = fit_inputs(data.x, shape), np.asarray(data.y).astype(np.int64)
        pruned_accuracy = (
            accuracy(module, eval_x, eval_y) if eval_x is not None and eval_y is not None else None
        )

        def loss(logits: Any, labels: Any, _batch: Any) -> Any:
            return torch.nn.functional.cross_entropy(logits.reshape(len(logits), -1), labels)

        result = fit(
            module, x, y, loss, self.config, self.config.epochs, self.name, self.context.on_epoch, masks
        )
        trained = {n: w.detach().numpy() for n, w in module.named_weights().items()}
        zeros_after = {n: int(np.count_nonzero(a == 0)) for n, a in trained.items()}
        out = out_dir / f"{model.stem}-ft.onnx"
        write_weights(model.path, trained, out)
        tuned_accuracy = (
            accuracy(module, eval_x, eval_y) if eval_x is not None and eval_y is not None else None
        )
        baseline = self.context.baseline
        chain = {
            "before pruning": baseline.accuracy if baseline is not None else None,
            "after pruning": pruned_accuracy,
            "after fine-tuning": tuned_accuracy,
        }
        elements = sum(a.size for n, a in trained.items() if n in zeros_before and zeros_before[n] > 0)
        kept = sum(zeros_after[n] for n, z in zeros_before.items() if z > 0)
        text = ", ".join(f"{k} {v:.2%}" for k, v in chain.items() if v is not None)
        return PassOutput(
            model=ModelArtifact(out, "onnx"),
            details={
                "accuracy": chain,
                "history": result.history,
                "best_epoch": result.best_epoch,
                "best_val_accuracy": result.best_val_accuracy,
                "masked_tensors": sorted(n for n, z in zeros_before.items() if z > 0),
                "zeros_before": zeros_before,
                "zeros_after": zeros_after,
            },
            sparsity=kept / elements if elements else None,
            notes=f"{len(result.history)} epochs (best {result.best_epoch}), pruned weights kept at zero; "
            f"top-1 {text}",
        )
