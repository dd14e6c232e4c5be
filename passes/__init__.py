"""Built-in passes, one module per technique. Importing this package registers them.

Each module imports only ``sparsify_fx``'s public API; the core imports this package
lazily (``sparsify_fx.registry.load_builtin_passes``) the first time a pass is needed.
"""

from . import dense_storage  # noqa: F401  (registers its ops: unpickling needs them)
from .activation_memory import ActivationMemory
from .block_sparse import BlockSparseActivations
from .dropit import DropIT
from .iso_flop import IsoFLOP
from .memory_budget import MemoryBudget
from .sliceout import SliceOut

__all__ = ["BlockSparseActivations", "DropIT", "IsoFLOP", "ActivationMemory", "SliceOut", "MemoryBudget"]
