"""``sfx.explain``: what a rewrite did, as an object for code and a rich report for people."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from .pass_base import Rewrite, Skip
from .sparsify import SparsifyRecord, record_of

__all__ = ["ExplainReport", "explain"]


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_flops(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} FLOP"


@dataclass
class ExplainReport:
    """What :func:`sparsify_fx.sparsify` did to a module.

    Attributes:
        capture_method / capture_notes / capture_failures: how the model was captured.
        recipe: the passes applied, as recipe strings.
        rewrites: every node replaced (:class:`~sparsify_fx.Rewrite`).
        skipped: every candidate left alone, with its reason (:class:`~sparsify_fx.Skip`).
        saved_bytes_before / saved_bytes_after: estimated bytes the rewritten layers save for
            backward, dense vs rewritten (only layers with recorded shapes count).
        flops_before / flops_after: forward FLOPs of the rewritten layers.
        verification: summary line of the eval-mode check, if one ran.
    """

    capture_method: str
    capture_notes: list[str]
    capture_failures: dict[str, str]
    recipe: list[str]
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    passes: list[tuple[str, int, int]] = field(default_factory=list)
    verification: str | None = None

    @property
    def saved_bytes_before(self) -> int:
        return sum(r.saved_bytes_before or 0 for r in self.rewrites if r.saved_bytes_after is not None)

    @property
    def saved_bytes_after(self) -> int:
        return sum(r.saved_bytes_after or 0 for r in self.rewrites if r.saved_bytes_after is not None)

    @property
    def flops_before(self) -> int:
        return sum(r.flops_before or 0 for r in self.rewrites)

    @property
    def flops_after(self) -> int:
        return sum(r.flops_after or 0 for r in self.rewrites)

    @classmethod
    def from_record(cls, record: SparsifyRecord) -> ExplainReport:
        return cls(
            capture_method=record.capture_method,
            capture_notes=list(record.capture_notes),
            capture_failures=dict(record.capture_failures),
            recipe=list(record.recipe),
            rewrites=list(record.rewrites),
            skipped=list(record.skips),
            passes=list(record.passes),
            verification=record.verification.summary() if record.verification else None,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["totals"] = {
            "saved_bytes_before": self.saved_bytes_before,
            "saved_bytes_after": self.saved_bytes_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
        }
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)

    # ------------------------------------------------------------ rendering (rich)

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.table import Table
        from rich.text import Text

        yield Text(f"sparsify_fx report  (captured by {self.capture_method})", style="bold")
        yield Text(f"recipe: {' + '.join(self.recipe)}")
        summary = Table(title="passes", show_lines=False)
        for col in ("pass", "rewritten", "skipped"):
            summary.add_column(col)
        for name, n_rew, n_skip in self.passes:
            summary.add_row(name, str(n_rew), str(n_skip))
        yield summary
        b0, b1 = self.saved_bytes_before, self.saved_bytes_after
        ratio = f" ({b1 / b0:.3f}x)" if b0 else ""
        yield Text(
            f"saved-for-backward inputs of rewritten layers: {_fmt_bytes(b0)} -> {_fmt_bytes(b1)}{ratio}; "
            f"forward FLOPs {_fmt_flops(self.flops_before)} -> {_fmt_flops(self.flops_after)}"
        )
        if self.verification:
            yield Text(f"verification: {self.verification}", style="green" if self.verification.startswith("ok") else "red")
        table = Table(title="rewritten layers")
        for col in ("module", "op", "pass", "saved before", "saved after", "FLOPs"):
            table.add_column(col, overflow="fold")
        for r in self.rewrites:
            table.add_row(r.module, r.op, r.pass_name, _fmt_bytes(r.saved_bytes_before),
                          _fmt_bytes(r.saved_bytes_after), _fmt_flops(r.flops_before))
        yield table
        if self.skipped:
            skipped = Table(title="skipped")
            for col in ("module", "op", "pass", "reason"):
                skipped.add_column(col, overflow="fold")
            for s in self.skipped:
                skipped.add_row(s.module or s.node, s.op, s.pass_name, s.reason)
            yield skipped
        for note in self.capture_notes:
            yield Text(f"note: {note}", style="dim")
        for method, why in self.capture_failures.items():
            yield Text(f"capture method {method} failed: {why}", style="dim")

    def render(self, width: int = 120) -> str:
        """The rich report as plain text."""
        from rich.console import Console

        console = Console(width=width, record=True, file=_Null(), color_system=None)
        console.print(self)
        return console.export_text()

    def __str__(self) -> str:
        return self.render()


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def explain(module: nn.Module) -> ExplainReport:
    """Report what :func:`sparsify_fx.sparsify` rewrote in ``module`` and what it skipped.

    Print it (``print(report)`` or ``rich.print(report)``) for tables; use ``.rewrites``,
    ``.skipped`` and ``.to_dict()`` from code. A module not made by ``sparsify`` is captured
    and reported with no rewrites, so the report still shows how it would be captured.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4),
        ...                         torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> report = sfx.explain(sfx.sparsify(m, "dropit:keep=0.5"))
        >>> len(report.rewrites), len(report.skipped)
        (1, 2)
    """
    record = record_of(module)
    if record is None:
        from .capture import capture

        cap = capture(module)
        record = SparsifyRecord(cap.method, cap.notes, cap.failures, [])
    return ExplainReport.from_record(record)
