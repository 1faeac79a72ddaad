"""Every exception the project raises on purpose survives a pickle round trip.

A worker process (``edgeagent bench`` runs each candidate in one) hands its exception back
pickled; ``InputError(message, code=...)`` used to fail to unpickle, which killed the pool's
result thread and left the parent waiting for ever.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import pickle
import pkgutil
import typing
from collections.abc import Iterator

import pytest

from edgeagent.errors import EdgeError, InputError

PACKAGES = ("edgeagent", "devices", "converter", "fleet")


def _import_everything() -> None:
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, f"{package}."):
            importlib.import_module(info.name)


def _subclasses(cls: type[EdgeError]) -> Iterator[type[EdgeError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


_import_everything()
ALL_ERRORS = sorted(set(_subclasses(EdgeError)) | {EdgeError}, key=lambda c: f"{c.__module__}.{c.__name__}")


def _value_for(name: str, hint: object) -> object:
    """A distinctive value of the type a constructor parameter declares."""
    options = typing.get_args(hint) or (hint,)
    for option in options:
        if isinstance(option, type) and issubclass(option, enum.Enum):
            return list(option)[-1]
        if option is int:
            return 7
        if typing.get_origin(option) is list:
            return ["a", "b"]
        if option is object:
            return {"payload": [1, 2]}
    return f"{name} value"


def _instance(cls: type[EdgeError]) -> EdgeError:
    hints = typing.get_type_hints(cls.__init__)
    hints.pop("return", None)
    kwargs = {}
    args = []
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        value = _value_for(param.name, hints.get(param.name, str))
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[param.name] = value
        else:
            args.append(value)
    return cls(*args, **kwargs)


def test_the_walk_finds_the_whole_tree() -> None:
    names = {c.__name__ for c in ALL_ERRORS}
    assert {"InputError", "ProfileInvalid", "RecipeError", "ConfigError", "InsufficientSpace"} <= names
    # A bug, not an error: no EdgeError handler may turn it into a rollback (edgeagent.deploy.machine).
    assert "IllegalTransition" not in names
    assert len(ALL_ERRORS) > 40


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_pickle_round_trip(cls: type[EdgeError]) -> None:
    original = _instance(cls)
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is cls
    assert str(copy) == str(original) and copy.args == original.args
    assert vars(copy) == vars(original)
    assert copy.code == original.code


def test_input_error_keeps_its_fields() -> None:
    copy = pickle.loads(pickle.dumps(InputError("wrong shape", code="bad_shape", tensor="x")))
    assert (str(copy), copy.code, copy.tensor) == ("wrong shape", "bad_shape", "x")
