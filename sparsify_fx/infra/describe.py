"""Short recipe descriptions for tables: a pass and only the fields that differ from defaults.

``PassConfig.describe()`` lists every field (it is data: it parses back to an equal config);
a table at 80 columns wants ``dropit:keep=0.1``, not five wrapped lines of defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparsify_fx.infra.config import PassConfig
from sparsify_fx.infra.recipes import parse_recipe

__all__ = ["short_description", "short_recipe"]

_MISSING = object()


def _defaults(config: PassConfig) -> dict[str, Any]:
    """Field -> its default as the config normalises it (a default-built config's value)."""
    try:
        built = type(config)()
        return {f.name: getattr(built, f.name) for f in dataclasses.fields(config)}
    except Exception:  # noqa: BLE001 - a config with required fields: the declared defaults
        out: dict[str, Any] = {}
        for f in dataclasses.fields(config):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out


def short_description(config: PassConfig) -> str:
    """``name:field=value,...`` for the fields that differ from their defaults.

    Example:
        >>> import sparsify_fx as sfx
        >>> short_description(sfx.DropIT(keep=0.3))
        'dropit:keep=0.3'
        >>> short_description(sfx.DropIT(keep=0.1))  # DropIT's default keep
        'dropit'
    """
    defaults = _defaults(config)
    parts = []
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        if f.name == "filter_fn":
            if value is not None:
                parts.append("filter_fn=<fn>")
            continue
        default = defaults.get(f.name, _MISSING)
        try:
            same = default is not _MISSING and bool(value == default)
        except Exception:  # noqa: BLE001 - values without a plain equality are shown
            same = False
        if not same:
            parts.append(f"{f.name}={value!r}" if isinstance(value, str) else f"{f.name}={value}")
    name = config.recipe_name or type(config).__name__
    return name + (":" + ",".join(parts) if parts else "")


def short_recipe(text: str) -> str:
    """A recipe string (``describe()`` output, items joined by ``+``) with defaults left out;
    the text itself when it does not parse (a ``filter_fn=<fn>`` item)."""
    try:
        return "+".join(short_description(c) for c in parse_recipe(text))
    except Exception:  # noqa: BLE001 - a description only; never fail a report on it
        return text
