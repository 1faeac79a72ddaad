"""A conversion recipe: data, evaluation, passes and packaging, from TOML or from flags.

See ``docs/converter.md`` for the format. Relative paths in a TOML recipe are relative to
the recipe file. Every table is validated by the pydantic config of what it configures, so
an unknown key or a bad value is an error naming the field.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from converter.data import DataConfig
from converter.errors import RecipeError
from converter.evaluate import EvaluateConfig
from converter.package import PackageConfig
from converter.passes import REGISTRY, pass_class
from converter.pipeline import PassSpec
from edgeagent.validation import problems

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]


class Recipe(BaseModel):
    """Everything one conversion needs besides the signing key and the output folder."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: Path | None = Field(default=None, description="Input model (the command line's MODEL wins).")
    data: DataConfig = Field(default_factory=DataConfig, description="Evaluation and calibration data.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="How each step is measured.")
    passes: list[PassSpec] = Field(default_factory=list, description="Passes, run in order.")
    package: PackageConfig | None = Field(default=None, description="Bundle settings; none = no bundle.")


def recipe_error(exc: ValidationError, prefix: str = "", known: Iterable[str] | None = None) -> RecipeError:
    """A RecipeError naming every invalid field of a pydantic error (unknown keys first)."""
    return RecipeError(problems(exc, prefix, known))


def parse_pass(index: int, table: dict[str, Any]) -> PassSpec:
    """One ``[[passes]]`` table: ``type`` names the pass, the other keys are its config."""
    fields = dict(table)
    name = fields.pop("type", None)
    if not isinstance(name, str):
        known = " | ".join(repr(name) for name in sorted(REGISTRY))
        raise RecipeError(f"needs type = {known}", where=f"passes[{index}]")
    cls = pass_class(name)
    try:
        return PassSpec(name, cls.config_class.model_validate(fields))
    except ValidationError as exc:
        raise recipe_error(exc, f"passes[{index}]", cls.config_class.model_fields) from exc


def recipe_from_dict(body: dict[str, Any], base: Path | None = None) -> Recipe:
    """Validate a recipe given as nested dicts (TOML's shape); resolve relative paths against ``base``."""
    body = dict(body)
    passes = [parse_pass(i, t) for i, t in enumerate(body.pop("passes", []) or [])]
    try:
        recipe = Recipe.model_validate({**body, "passes": []})
    except ValidationError as exc:
        raise recipe_error(exc) from exc
    recipe = recipe.model_copy(update={"passes": passes})
    return _resolve(recipe, base) if base is not None else recipe


def load_recipe(path: Path) -> Recipe:
    """Read and validate a TOML recipe."""
    try:
        body = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RecipeError(f"{path}: no such recipe file") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{path}: not a readable TOML file ({exc})") from exc
    try:
        return recipe_from_dict(body, base=path.parent)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from exc


def _resolve(recipe: Recipe, base: Path) -> Recipe:
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    data = recipe.data.model_copy(
        update={
            "eval": fix(recipe.data.eval),
            "calib": fix(recipe.data.calib),
            "train": fix(recipe.data.train),
        }
    )
    package = recipe.package
    if package is not None and package.labels is not None:
        package = package.model_copy(update={"labels": fix(package.labels)})
    return recipe.model_copy(update={"model": fix(recipe.model), "data": data, "package": package})
