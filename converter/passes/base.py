"""What every pass is: a class with a typed config and one ``run(model, out_dir)``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from converter.data import Dataset
from converter.errors import PassFailed
from converter.evaluate import Evaluator, Metrics
from converter.model import ModelArtifact, ModelKind


class PassConfig(BaseModel):
    """Base of pass configs: unknown fields are refused, so a typo in a recipe is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class EpochLog:
    """One training epoch of a pass that trains (finetune, distill). Accuracy as a fraction 0-1."""

    pass_name: str
    epoch: int
    epochs: int
    loss: float
    val_accuracy: float


@dataclass
class PassContext:
    """What a pass may use besides its input model: the data, the evaluator, the baseline."""

    data: Dataset | None = None
    evaluator: Evaluator | None = None
    baseline: Metrics | None = None
    #: Called after every training epoch (the CLI shows loss and validation accuracy).
    on_epoch: Callable[[EpochLog], None] | None = None


@dataclass
class PassOutput:
    """A pass's result: the new model (may be the input, unchanged) and what the report shows."""

    model: ModelArtifact
    details: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    sparsity: float | None = None
    #: Already measured by the pass (the search does), so the pipeline need not measure again.
    metrics: Metrics | None = None


C = TypeVar("C", bound=PassConfig)


class Pass(ABC, Generic[C]):
    """One step of the pipeline. Subclasses set ``name``, ``config_class`` and ``accepts``."""

    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]]
    #: Model kinds the pass takes as input.
    accepts: ClassVar[frozenset[ModelKind]]
    #: Kind of model the pass writes; None = the same kind as its input.
    produces: ClassVar[ModelKind | None] = None
    #: True when no pass may follow (its output is not what other passes read).
    terminal: ClassVar[bool] = False
    #: The only passes that may come after this one; None = any.
    followers: ClassVar[frozenset[str] | None] = None

    def __init__(self, config: C, context: PassContext | None = None) -> None:
        self.config = config
        self.context = context or PassContext()

    def check_input(self, model: ModelArtifact) -> None:
        if model.kind not in self.accepts:
            raise PassFailed(
                f"takes {', '.join(sorted(self.accepts))} models, not {model.kind} ({model.path.name})",
                pass_name=self.name,
            )

    @abstractmethod
    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        """Transform ``model`` into a new file under ``out_dir``."""
