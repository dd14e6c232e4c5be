"""The ``node.meta`` keys sparsify_fx writes and reads, in one place.

Every analysis and pass reads a node's recorded facts through these names
(``node.meta[meta.SHAPE]``), so a key is spelled once and each has one stated writer.
The values stay plain strings with the ``sfx_`` prefix: they share ``node.meta`` with
torch's own keys (``nn_module_stack``, ``stack_trace``, ``val``) and survive graph copies.
"""

from __future__ import annotations

__all__ = ["SHAPE", "MODULE", "MODULE_TYPE", "ORIGIN", "AUTOCAST", "NO_GRAD", "VALUE"]

#: ``(shape tuple, dtype)`` of the tensor the node computes. Written by
#: :class:`~sparsify_fx.ShapeRecorder` (``sparsify(example_inputs=...)``) and kept current by
#: passes that change a shape (IsoFLOP's widened layers); absent when no inputs were given.
SHAPE = "sfx_shape"

#: the number a placeholder took in the recorded run, where it is not a tensor (a Dynamo
#: graph's dynamic size, passed as a SymInt). Written by ``ShapeRecorder`` beside ``SHAPE``;
#: read where a graph is run on inputs made from the record (MemoryBudget's trial steps).
VALUE = "sfx_value"

#: qualified name, relative to the graph, of the model module the node comes from ('' for
#: top-level code). Written by canonicalize, the export / Dynamo captures and the compile
#: backend, and by passes and ``recompute_segment`` for the nodes they create.
MODULE = "sfx_module"

#: class name of the leaf module a ``call_module`` node was expanded from (canonicalize).
MODULE_TYPE = "sfx_module_type"

#: name of the original node a replacement stands for. Written by ``replace_node``; read by
#: ``verify`` and the memory plan to match rewritten nodes to the original graph, and shown by
#: ``explain``.
ORIGIN = "sfx_origin"

#: a GraphModule-level key (``gm.meta``, not ``node.meta``): the autocast dtype the recorded
#: shapes were taken under and the training forward runs at. Written by ``MemoryBudget``
#: (``passes/memory_budget/planner.py``) and, for a graph Dynamo captured under autocast, by
#: the Dynamo rewrite (``compiler/backend.py``); read by ``memory_plan``, which then counts the
#: copies autocast saves (matmul inputs and weights cast to this dtype).
AUTOCAST = "sfx_autocast"

#: a GraphModule-level key: True on a graph Dynamo captured with grad disabled (an eval or
#: ``torch.no_grad()`` call), whose run saves nothing for backward. Written by the Dynamo
#: rewrite (``compiler/backend.py``); ``MemoryBudget`` skips such graphs instead of planning.
NO_GRAD = "sfx_no_grad"
