"""Exceptions raised by :mod:`converter`, one root for the whole package.

::

    EdgeError (edgeagent.errors)        the CLI prints any of these in one line
    └── ConverterError                  root of everything the converter raises on purpose
        ├── RecipeError                 a recipe or flag combination is invalid (also a UsageError: exit 2)
        ├── MissingExtra                an optional dependency is not installed (also a UsageError)
        ├── ModelLoadError              the input model cannot be read or is of an unsupported kind
        │   └── ModelPathError          no such file, not a model folder, unknown suffix (a UsageError)
        ├── DataError                   evaluation/calibration data is missing, unreadable or misshapen
        │                               (also a UsageError)
        └── PassFailed                  a pass (or the library it wraps) failed; ``pass_name`` says which

Third-party errors (onnx, onnxruntime, tensorflow, torch) are translated where the converter
calls them, with ``raise ... from exc``.
"""

from __future__ import annotations

from edgeagent.errors import EdgeError, UsageError


class ConverterError(EdgeError):
    """Root of every error raised on purpose by the converter."""


class RecipeError(ConverterError, UsageError):
    """A recipe (TOML or flags) asks for something invalid; ``where`` names the field."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class MissingExtra(ConverterError, UsageError):
    """An optional dependency is missing; the message is the ``pip install`` line to run."""

    def __init__(self, message: str, *, module: str, extra: str) -> None:
        super().__init__(message)
        self.module = module
        self.extra = extra


class ModelLoadError(ConverterError):
    """The input model cannot be read, or its kind is not supported."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ModelPathError(ModelLoadError, UsageError):
    """The input path names no model: missing, a folder that is not a SavedModel, an unknown suffix."""


class DataError(ConverterError, UsageError):
    """Evaluation or calibration data is missing, unreadable, or does not fit the model."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class PassFailed(ConverterError):
    """A pass could not produce its output; ``pass_name`` names the pass."""

    def __init__(self, message: str, *, pass_name: str) -> None:
        super().__init__(f"{pass_name}: {message}")
        self.pass_name = pass_name
