"""Registry from config type to the private transform that applies it.

Built-in passes live in the top-level ``passes`` package and are imported lazily, in
exactly one place (:func:`load_builtin_passes`), the first time a pass is looked up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from sparsify_fx.errors import RecipeError
from sparsify_fx.infra.config import PassConfig

__all__ = ["PassSpec", "register_pass", "lookup", "lookup_name", "registered", "load_builtin_passes"]


@dataclass(frozen=True)
class PassSpec:
    """A registered pass: its config type, recipe-string name and transform."""

    config_type: type[PassConfig]
    name: str
    transform: Callable


_BY_TYPE: dict[type[PassConfig], PassSpec] = {}
_BY_NAME: dict[str, PassSpec] = {}
_builtins_loaded = False


def load_builtin_passes() -> None:
    """Import the built-in ``passes`` package once (it registers itself)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("sparsify_fx.passes")


def register_pass(config_type: type[PassConfig], *, name: str | None = None) -> Callable:
    """Decorator registering ``transform(gm, config, ctx) -> PassResult`` for ``config_type``.

    Example:
        >>> from dataclasses import dataclass
        >>> import sparsify_fx as sfx
        >>> @dataclass(frozen=True)
        ... class Noop(sfx.PassConfig):
        ...     pass
        >>> @sfx.register_pass(Noop, name="noop")
        ... def _noop(gm, config, ctx):
        ...     return sfx.PassResult(gm, modified=False)
    """
    if not (isinstance(config_type, type) and issubclass(config_type, PassConfig)):
        raise TypeError(f"register_pass needs a PassConfig subclass, got {config_type!r}")
    recipe_name = (name or config_type.__name__).lower()

    def decorator(transform: Callable) -> Callable:
        spec = PassSpec(config_type, recipe_name, transform)
        _BY_TYPE[config_type] = spec
        _BY_NAME[recipe_name] = spec
        config_type.recipe_name = recipe_name
        return transform

    return decorator


def lookup(config: PassConfig) -> PassSpec:
    """The registered pass for a config object."""
    load_builtin_passes()
    for klass in type(config).__mro__:
        if klass in _BY_TYPE:
            return _BY_TYPE[klass]
    raise RecipeError(
        f"no pass is registered for {type(config).__name__}; "
        "decorate its transform with sparsify_fx.register_pass"
    )


def lookup_name(name: str) -> PassSpec:
    """The registered pass for a recipe-string name ("dropit")."""
    load_builtin_passes()
    spec = _BY_NAME.get(name.lower())
    if spec is None:
        raise RecipeError(f"unknown pass {name!r} in recipe; known: {sorted(_BY_NAME)}")
    return spec


def registered() -> dict[str, PassSpec]:
    """Every registered pass by recipe name."""
    load_builtin_passes()
    return dict(_BY_NAME)
