"""sparsify_fx: torch.fx graph rewrites that make neural-network training cheaper.

    >>> import torch, sparsify_fx as sfx
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> fast = sfx.sparsify(model, sfx.DropIT(keep=0.1), example_inputs=(torch.randn(8, 16),))

Technique configs (``DropIT``, ...) live in the built-in ``passes`` package and are
loaded lazily on first access.
"""

from __future__ import annotations

from typing import Any

from sparsify_fx.amp import autocast_region
from sparsify_fx.analysis.memory_plan import (
    MemoryPlan,
    TensorLiveness,
    compressed_bytes_of,
    math_attention_bytes,
    memory_plan,
    overwritten_in_place,
)
from sparsify_fx.analysis.segments import (
    Block,
    RecomputedSegment,
    find_blocks,
    grad_only_linear,
    recompute_segment,
)
from sparsify_fx.analysis.shapes import (
    ShapeRecorder,
    conv_output_spatial,
    dense_op_flops,
    tensor_bytes,
    tensor_meta,
)
from sparsify_fx.analysis.slice_groups import (
    ForbiddenSliceGroup,
    SliceConsumer,
    SliceGroup,
    SliceGroupAnalysis,
    SliceProducer,
    find_slice_groups,
)
from sparsify_fx.compiler.backend import backend
from sparsify_fx.errors import (
    CaptureError,
    ConfigError,
    PassError,
    RecipeError,
    SparsifyError,
    VerificationError,
)
from sparsify_fx.frontend.canonical import canonicalize
from sparsify_fx.frontend.cascade import CAPTURE_METHODS, Capture, capture, structural_copy
from sparsify_fx.graph import meta, op_table
from sparsify_fx.graph.form import (
    DenseOp,
    dense_op,
    find_dense_ops,
    has_hooks,
    install_module,
    module_name_of,
    replace_node,
)
from sparsify_fx.graph.op_module import OpModule
from sparsify_fx.infra.config import PassConfig, check_range
from sparsify_fx.infra.pass_base import (
    PassContext,
    PassPlan,
    PassResult,
    PlanOption,
    PlanUnit,
    Rewrite,
    Skip,
    run_pass,
)
from sparsify_fx.infra.recipes import parse_recipe, resolve_recipe
from sparsify_fx.infra.registry import register_pass, registered
from sparsify_fx.optim import extend_optimizer, new_parameters
from sparsify_fx.report.explain import ExplainReport, PassSummary, explain, graph_diff
from sparsify_fx.sparsify import SparsifyRecord, sparsify
from sparsify_fx.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "sparsify", "capture", "verify", "explain", "graph_diff", "PassSummary", "backend",
    "new_parameters", "extend_optimizer",
    "Capture", "CAPTURE_METHODS", "VerifyReport", "ExplainReport", "SparsifyRecord",
    "PassConfig", "PassResult", "PassContext", "Rewrite", "Skip", "register_pass", "registered",
    "run_pass", "PassPlan", "PlanUnit", "PlanOption", "OpModule", "meta", "op_table", "has_hooks",
    "parse_recipe", "resolve_recipe", "check_range",
    "DenseOp", "dense_op", "find_dense_ops", "install_module", "replace_node", "canonicalize", "module_name_of",
    "ShapeRecorder", "conv_output_spatial", "autocast_region", "tensor_meta", "tensor_bytes", "dense_op_flops", "structural_copy",
    "SparsifyError", "ConfigError", "RecipeError", "CaptureError", "PassError", "VerificationError",
    "memory_plan", "compressed_bytes_of", "overwritten_in_place", "math_attention_bytes", "MemoryPlan", "TensorLiveness",
    "find_blocks", "Block", "recompute_segment", "RecomputedSegment", "grad_only_linear",
    "DropIT",
    "find_slice_groups", "SliceGroup", "SliceProducer", "SliceConsumer", "ForbiddenSliceGroup", "SliceGroupAnalysis",
]


def __getattr__(name: str) -> Any:
    # technique configs come from the built-in passes package, imported on first use
    from sparsify_fx.infra.registry import load_builtin_passes

    load_builtin_passes()
    import sparsify_fx.passes as passes
    if name in getattr(passes, "__all__", ()):
        return getattr(passes, name)
    raise AttributeError(f"module 'sparsify_fx' has no attribute {name!r}")
