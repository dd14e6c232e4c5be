"""MemoryBudget: keep / compress / recompute per block under a byte budget."""

from sparsify_fx.passes.memory_budget.planner import MemoryBudget

__all__ = ["MemoryBudget"]
