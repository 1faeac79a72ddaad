"""ORT's quantization pre-processing, with a fallback chain for graphs it cannot handle.

``quant_pre_process`` runs symbolic shape inference, then ORT's basic graph optimisation (which
folds BatchNormalization into the Conv before it, among others), then ONNX shape inference.
Symbolic shape inference fails on many exported graphs: an ``AssertionError`` with no message in
a Concat of shape values along axis -1, ``Incomplete symbolic shape inference`` on detectors
whose height and width are dynamic. Skipping pre-processing altogether then ships an int8 file
larger and slower than the float one (BatchNorm stays in float, unfolded), so the chain is:

1. ``symbolic``: ``quant_pre_process`` as ORT ships it;
2. ``skip_symbolic_shape``: ``quant_pre_process(skip_symbolic_shape=True)``: optimisation and
   ONNX shape inference;
3. ``onnx_shape``: ORT's basic optimisation in our own session (it raises where ORT's wrapper
   only logs), then ONNX shape inference.

Every branch keeps the graph optimisation. The first that succeeds wins and is named in the
pass notes; when all fail, the error gives each branch's own reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from converter import extras
from converter.errors import PassFailed
from converter.model import load_onnx

Branch = Callable[[Path, Path], None]
#: The pass whose errors these are (quantize; search quantizes through it).
_OWNER = "quantize"


@dataclass(frozen=True)
class Prepared:
    """The pre-processed file, which branch made it, and how many of the source's BatchNormalization
    nodes it folded (into the Conv before them)."""

    path: Path
    branch: str
    batchnorms: int
    folded_batchnorms: int
    #: Why each earlier branch failed, in order (empty when the first one worked).
    failures: tuple[str, ...] = ()

    @property
    def note(self) -> str:
        text = f"pre-processing: {self.branch}"
        if self.failures:
            text += f" (after {'; '.join(self.failures)})"
        if self.batchnorms:
            text += f"; {self.folded_batchnorms} of {self.batchnorms} BatchNormalization folded"
        return text


def error_reason(exc: BaseException) -> str:
    """A one-line reason that is never empty: an ``AssertionError()`` says where it was raised."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if message:
        return f"{type(exc).__name__}: {message}"
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return repr(exc)
    last = frames[-1]
    return f"{exc!r} in {last.name} ({Path(last.filename).name}:{last.lineno})"


def _symbolic(source: Path, out: Path) -> None:
    if not extras.available("sympy"):
        raise RuntimeError("sympy is not installed (ORT's symbolic shape inference needs it)")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(source), str(out))


def _skip_symbolic(source: Path, out: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(source), str(out), skip_symbolic_shape=True)


class _ErrorLog(logging.Handler):
    """Keeps what ORT's pre-processing logs at ERROR: it logs a failed optimisation and goes on."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _optimisation_must_run() -> Iterator[None]:
    """Turn ORT's logged-and-ignored optimisation failure into an error (BatchNorm would stay unfolded)."""
    logger = logging.getLogger("onnxruntime.quantization.shape_inference")
    handler = _ErrorLog()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.messages:
        # The last record is the traceback; its last line is the reason.
        lines = [line for line in handler.messages[-1].strip().splitlines() if line.strip()]
        raise RuntimeError(f"graph optimisation failed ({lines[-1] if lines else handler.messages[0]})")


def _onnx_shape(source: Path, out: Path) -> None:
    onnx = extras.require("onnx")
    import onnxruntime as ort

    optimized = out.with_name(out.stem + ".optimized.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    inferred = onnx.shape_inference.infer_shapes(load_onnx(optimized))
    onnx.save(inferred, str(out))


#: The chain, in order: (name shown in notes and errors, function(source, out)).
BRANCHES: tuple[tuple[str, Branch], ...] = (
    ("symbolic shape inference", _symbolic),
    ("skip_symbolic_shape", _skip_symbolic),
    ("ONNX shape inference", _onnx_shape),
)


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Run in ``folder``: ORT's symbolic inference leaves ``sym_shape_infer_temp.onnx`` in the cwd."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _batchnorms(path: Path) -> int:
    return sum(node.op_type == "BatchNormalization" for node in load_onnx(path).graph.node)


def prepare(source: Path, tmp: Path, branches: tuple[tuple[str, Branch], ...] = BRANCHES) -> Prepared:
    """Pre-process ``source`` into ``tmp`` with the first branch that works."""
    failures: list[str] = []
    source, tmp = source.resolve(), tmp.resolve()  # the branches run inside their own folder
    for index, (name, branch) in enumerate(branches):
        work = Path(tempfile.mkdtemp(dir=tmp, prefix=f"pre{index}-"))
        out = work / "preprocessed.onnx"
        try:
            # ORT prints progress and writes scratch files; neither belongs to the user.
            with _inside(work), contextlib.redirect_stdout(io.StringIO()), _optimisation_must_run():
                branch(source, out)
            if not out.is_file():
                raise RuntimeError("no output file written")
        except Exception as exc:  # ORT's shape inference raises assorted errors on odd graphs
            failures.append(f"{name} failed: {error_reason(exc)}")
            continue
        before = _batchnorms(source)
        return Prepared(out, name, before, before - _batchnorms(out), tuple(failures))
    raise PassFailed("ORT pre-processing failed: " + "; ".join(failures), pass_name=_OWNER)
