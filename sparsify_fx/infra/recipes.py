"""Recipes: one config, a list of them, or a recipe string like ``"dropit:keep=0.1"``.

Several passes in one string are joined with ``+``: ``"sliceout:p=0.25+dropit:keep=0.1"``.
Values are Python literals (``0.1``, ``True``, ``'a*'``, ``['x', 'y']``); bare words are strings.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

from sparsify_fx.errors import ConfigError, RecipeError
from sparsify_fx.infra.config import PassConfig
from sparsify_fx.infra.registry import lookup, lookup_name

__all__ = ["Recipe", "resolve_recipe", "parse_recipe"]

Recipe = PassConfig | str | Sequence[PassConfig | str]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_recipe(text: str) -> list[PassConfig]:
    """Parse ``"name:key=value,key=value+name2"`` into configs."""
    configs = []
    if not text.strip():
        raise RecipeError("empty recipe string; e.g. 'dropit:keep=0.1'")
    for item in text.split("+"):
        name, _, body = item.strip().partition(":")
        spec = lookup_name(name.strip())
        kwargs: dict[str, Any] = {}
        for part in _split_args(body):
            key, eq, value = part.partition("=")
            if not eq:
                raise RecipeError(f"recipe item {item!r}: expected key=value, got {part!r}")
            kwargs[key.strip()] = _literal(value.strip())
        try:
            configs.append(spec.config_type(**kwargs))
        except TypeError as e:
            raise RecipeError(f"recipe item {item!r}: {e}") from e
        except ConfigError:
            raise
    return configs


def _split_args(body: str) -> list[str]:
    # commas inside [...] or (...) belong to a value
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p for p in parts if p.strip()]


def resolve_recipe(recipe: Recipe) -> list[PassConfig]:
    """Normalise any recipe form to a list of configs with registered passes."""
    if isinstance(recipe, PassConfig):
        items: list[Any] = [recipe]
    elif isinstance(recipe, str):
        items = parse_recipe(recipe)
    elif isinstance(recipe, Sequence):
        items = []
        for r in recipe:
            items.extend(parse_recipe(r) if isinstance(r, str) else [r])
    else:
        raise RecipeError(
            f"a recipe is a pass config (e.g. sfx.DropIT(keep=0.1)), a list of them, or a "
            f"string like 'dropit:keep=0.1'; got {type(recipe).__name__}"
        )
    if not items:
        raise RecipeError("empty recipe: give at least one pass config")
    for item in items:
        if not isinstance(item, PassConfig):
            raise RecipeError(f"recipe item {item!r} is not a pass config")
        lookup(item)
    return items
