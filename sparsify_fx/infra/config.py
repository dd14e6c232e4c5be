"""The base of every pass config: which layers a pass may touch.

A config is a frozen dataclass ("recipe item"). Technique configs subclass
:class:`PassConfig`, add their own fields, and validate them in ``__post_init__``
(call ``super().__post_init__()``).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch.nn as nn

from sparsify_fx.errors import ConfigError

__all__ = ["PassConfig", "LayerFilter", "check_range"]

LayerFilter = Callable[[str, "nn.Module | None"], bool]


def check_range(
    config: object,
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise :class:`ConfigError` naming ``type(config).field`` when value is outside the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"{type(config).__name__}.{name} must be a number, got {value!r} ({type(value).__name__})"
        )
    if not math.isfinite(value):
        # (NaN compares False with every bound, so the range check alone would pass it)
        raise ConfigError(f"{type(config).__name__}.{name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(
            f"{type(config).__name__}.{name} must be in {lo}{low}, {high}{hi}, got {value!r}"
        )


def _as_patterns(config: object, name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        items = tuple(value)
        if all(isinstance(v, str) for v in items):
            return items
    raise ConfigError(
        f"{type(config).__name__}.{name} must be a glob pattern or a list of them "
        f"(e.g. 'layer1.*'), got {value!r}"
    )


@dataclass(frozen=True, kw_only=True)
class PassConfig:
    """Fields every pass config shares.

    Args:
        include: glob patterns on qualified module names (``"layer1.*"``, ``"*.fc1"``);
            when given, only matching layers are rewritten.
        exclude: glob patterns of layers never rewritten (wins over ``include``).
        filter_fn: ``filter_fn(qualified_name, module_or_None) -> bool``; a layer is
            rewritten only if it returns True (applied after include/exclude).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    filter_fn: LayerFilter | None = field(default=None, compare=False)

    #: short name used in recipe strings ("dropit:keep=0.1"); set by register_pass.
    recipe_name: ClassVar[str] = ""
    #: the pass's decisions are a fraction of what the graph holds at its recorded sizes (a
    #: budget): a Dynamo graph with a dynamic length is re-planned when the length grows
    #: (``sfx.compiler.backend.REPLAN_GROWTH``)
    plans_per_size: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _as_patterns(self, "include", self.include))
        object.__setattr__(self, "exclude", _as_patterns(self, "exclude", self.exclude))
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError(
                f"{type(self).__name__}.filter_fn must be callable(name, module) -> bool, "
                f"got {self.filter_fn!r}"
            )

    def selection_reason(self, qualified_name: str, module: nn.Module | None = None) -> str | None:
        """None when the layer is selected, else why it is not (used in skip reports)."""
        if self.include and not any(fnmatch.fnmatchcase(qualified_name, p) for p in self.include):
            return f"not matched by include={list(self.include)}"
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(qualified_name, pattern):
                return f"excluded by pattern {pattern!r}"
        if self.filter_fn is not None and not self.filter_fn(qualified_name, module):
            return "filter_fn returned False"
        return None

    def describe(self) -> str:
        """``name:field=value,...`` for the fields that differ from their defaults."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "filter_fn":
                if value is not None:
                    parts.append("filter_fn=<fn>")
                continue
            if f.name in ("include", "exclude") and not value:
                continue
            parts.append(f"{f.name}={value!r}" if isinstance(value, str) else f"{f.name}={value}")
        name = self.recipe_name or type(self).__name__
        return name + (":" + ",".join(parts) if parts else "")
