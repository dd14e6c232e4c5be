"""Register a pass of your own: scale every Linear's output, through the public registry.

A pass is a frozen config dataclass plus a transform ``(gm, config, ctx) -> PassResult``
that works on the canonical graph (Linear is ``F.linear(x, get_attr w, get_attr b)``).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx


@dataclass(frozen=True)
class ScaleLinear(sfx.PassConfig):
    """Multiply each selected Linear's output by ``factor``.

    Args:
        factor: the scale, > 0.
    """

    factor: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        sfx.check_range(self, "factor", self.factor, 0.0, 1e6, low_open=True)


@sfx.register_pass(ScaleLinear, name="scale_linear")
def _scale_linear(gm, config: ScaleLinear, ctx) -> sfx.PassResult:
    ops, _ = sfx.find_dense_ops(gm)
    result = sfx.PassResult(gm, modified=False)
    for op in ops:
        reason = ctx.selection_reason(config, op, op.module_name, gm)
        if op.kind != "linear":
            reason = reason or f"{op.kind} is not a Linear"
        if reason:
            result.skips.append(ctx.skip(op, reason))
            continue
        with gm.graph.inserting_after(op.node):
            scaled = gm.graph.call_function(torch.mul, (op.node, config.factor))
        op.node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        result.rewrites.append(sfx.Rewrite(ctx.pass_name, op.node.name, ctx.qualified(op.module_name),
                                           "linear", "torch.mul"))
        result.modified = True
    return result


if __name__ == "__main__":
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    scaled = sfx.sparsify(model, ScaleLinear(factor=2.0, exclude="0"), verify=False)
    torch.testing.assert_close(scaled(x), 2.0 * model(x), rtol=1e-6, atol=1e-6)
    # the same pass from a recipe string, combined with a built-in one
    both = sfx.sparsify(model, "scale_linear:factor=2.0,exclude='0'+dropit:keep=0.5", verify=False)
    print(sfx.explain(both))
    print("custom pass ok:", F.relu(scaled(x)).shape)
