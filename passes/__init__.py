"""Built-in passes, one module per technique. Importing this package registers them.

Each module imports only ``sparsify_fx``'s public API; the core imports this package
lazily (``sparsify_fx.infra.registry.load_builtin_passes``) the first time a pass is needed.
"""

from sparsify_fx.passes.activation_memory import dense_storage  # noqa: F401  (registers its ops: unpickling needs them)
from sparsify_fx.passes.activation_memory.rewrite import ActivationMemory
from sparsify_fx.passes.block_sparse.rewrite import BlockSparseActivations
from sparsify_fx.passes.dropit import DropIT
from sparsify_fx.passes.iso_flop import IsoFLOP
from sparsify_fx.passes.memory_budget.planner import MemoryBudget
from sparsify_fx.passes.sliceout import SliceOut

__all__ = ["BlockSparseActivations", "DropIT", "IsoFLOP", "ActivationMemory", "SliceOut", "MemoryBudget"]
