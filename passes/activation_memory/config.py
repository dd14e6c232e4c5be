"""The ActivationMemory config: one field per op family, each naming how that op stores what
its backward needs (the forms are described in ``rewrite.py``'s docstring)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsify_fx.passes.kernels.bf16_matmul import WEIGHT_GRAD

import sparsify_fx as sfx
from sparsify_fx import ConfigError, PassConfig

__all__ = ["ActivationMemory", "GRAD_ERROR_BOUNDS", "STORAGE_FORMS", "FUSED_FORMS"]

STORAGE_FORMS = ("bf16", "int8", "off")
#: fused with the consumer and recomputed in backward, keeping the input exactly or as bf16
FUSED_FORMS = ("recompute", "recompute-bf16")

#: documented gradient-error constants (see the module docstring): for bf16 storage
#: ``|dgrad| <= bound * |grad_out|``; for int8 ``|dgrad| <= bound * absmax_block * |grad_out|``.
GRAD_ERROR_BOUNDS: dict[tuple[str, str], float] = {
    ("gelu", "bf16"): 1.3e-3,
    ("silu", "bf16"): 1.2e-3,
    ("gelu", "int8"): 0.7979 / 254,
    ("silu", "int8"): 0.5 / 254,
}


@dataclass(frozen=True)
class ActivationMemory(PassConfig):
    """Make activations and norms keep compressed copies of what their backward needs.

    Args:
        relu: ``"bitmask"`` (1 bit per element, exact gradient) or ``"off"``; applies to
            ReLU and LeakyReLU.
        gelu: how GELU stores its input: ``"bf16"``, ``"int8"`` (per-block absmax scale)
            or ``"off"``; or ``"recompute"``: a GELU whose only consumer is a Linear is fused
            with it, and the pair keeps only the GELU's input (the GELU output the Linear
            would keep is recomputed in backward: exact gradients, one GELU per step extra).
        silu: the same for SiLU.
        batchnorm: how BatchNorm stores its normalised input ``x_hat``: ``"bf16"``,
            ``"int8"`` or ``"off"``; or ``"recompute"``: a BatchNorm module feeding only a
            ReLU (or ReLU6, ``Hardtanh(0, upper)``) that feeds only a Conv (ResNet, DenseNet,
            MobileNetV2) is fused with both, and the three
            keep only the BatchNorm's input and channel statistics (the ReLU output the Conv
            would keep is rebuilt in backward: exact gradients; ``activation_memory/bn_relu_conv.py``).
            Other BatchNorms stay dense, with the reason.
            ``"recompute-bf16"`` (this and ``gelu`` / ``silu`` / ``layernorm``): the same fusion
            keeping a bf16 copy of the input (of ``x_hat`` for a norm) instead of the input,
            approximate; the ops that do not fuse store ``"bf16"``.
        layernorm: the same for LayerNorm; ``"recompute"`` fuses a LayerNorm whose only
            consumer is a Linear with it and recomputes the normalised tensor in backward
            (exact; the pair keeps the LayerNorm's input and its row statistics).
        scale: how a multiplication by a learned parameter (LayerScale, ResMLP's Affine)
            stores its activation operand for the parameter's gradient: ``"bf16"``,
            ``"int8"`` or ``"off"``.
        attention: ``scaled_dot_product_attention`` without a mask or dropout keeps q, k, v
            as ``"bf16"`` / ``"int8"`` instead of q, k, v *and* its output in full precision,
            and recomputes the attention probabilities in backward (approximate: the
            gradients see the rounded q, k, v). ``"off"`` (the default) leaves it dense.
        attention_output: ``"recompute"`` (the default): the attention's output is not kept,
            and backward re-runs the attention on the stored q, k, v. ``"keep"``: the op keeps
            its output and log-sum-exp as well, and backward runs only the CPU flash kernel's
            backward (GPT-2-style shapes: 11 ms per attention's forward + backward instead of
            15, dense 11). The output is usually held anyway, by the projection after it (a
            view of the same storage), so this costs one float per query row; where the
            projection keeps a compressed copy (``dense="bf16"``, DropIT) it costs the output.
            Off the CPU flash kernel (a GPU, a head size that differs between q and v) the
            attention is re-run as with ``"recompute"``.
        attention_dropout: ``"recompute"`` (the default): ``scaled_dot_product_attention``
            with dropout, which on a CPU runs the math path and keeps three
            ``[*batch, Lq, Lk]`` tensors (fp32 copies of 2-byte q, k, v too), keeps q, k, v
            (compressed as ``attention`` says, else as they are) and a seed instead, and
            recomputes the probabilities and the dropout mask in backward
            (``activation_memory/attention_dropout.py``; exact for the mask drawn, one more
            ``q @ k^T`` and softmax per attention). Its held bytes then grow with the sequence
            length, not its square. ``"off"`` leaves it dense. Not on a GPU, whose fused
            kernels take dropout without keeping the scores.
        dense: ``"bf16"``: Linear / Conv / matmul-against-a-weight keep their input as bf16
            for the weight gradient (``activation_memory/dense_storage.py``; forward and input gradient
            exact, the weight gradient sees the rounded input); ``"off"`` (the default).
            Dense ops an earlier pass rewrote (DropIT) are left to it.
        maxpool: ``"indices"`` (default): 2-D max pooling keeps only the index of each maximum,
            as int16 (int32 for planes over 32768 elements), not its input and int64 indices
            (``activation_memory/max_pool.py``; exact, the dense gradient bit for bit); ``"off"``.
        weight_grad: how an op keeping a Linear / Conv input as bf16 (``dense="bf16"``, the
            ``"recompute-bf16"`` fusions) computes the weight gradient: ``"auto"`` (default) on
            bf16 operands where the device has bf16 matrix units (AVX512-BF16 / AMX CPUs,
            CUDA compute capability >= 8.0: 2-4x faster, to first order
            ``3 * 2^-8 * sum|grad_out||x|`` error instead of ``2^-8``), else in the input's precision; ``"bf16"`` on bf16
            operands everywhere; ``"input"`` in the input's precision everywhere
            (``kernels/bf16_matmul.py``).
        block_size: elements per int8 scale block, 16..65536.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        ...                         torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> fast = sfx.sparsify(m, sfx.ActivationMemory(), example_inputs=(torch.randn(2, 3, 8, 8),))
        >>> sorted(r.op for r in sfx.explain(fast).rewrites)
        ['batch_norm', 'relu']
    """

    relu: str = "bitmask"
    gelu: str = "bf16"
    silu: str = "bf16"
    batchnorm: str = "bf16"
    layernorm: str = "bf16"
    scale: str = "bf16"
    attention: str = "off"
    attention_output: str = "recompute"
    attention_dropout: str = "recompute"
    dense: str = "off"
    maxpool: str = "indices"
    weight_grad: str = "auto"
    block_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.relu not in ("bitmask", "off"):
            raise ConfigError(f"ActivationMemory.relu must be 'bitmask' or 'off', got {self.relu!r}")
        for name in ("gelu", "silu", "batchnorm", "layernorm", "scale", "attention"):
            value = getattr(self, name)
            if value in FUSED_FORMS and name in ("gelu", "silu", "layernorm", "batchnorm"):
                continue
            if value not in STORAGE_FORMS:
                raise ConfigError(
                    f"ActivationMemory.{name} must be one of {list(STORAGE_FORMS)}, got {value!r}"
                )
        if self.attention_output not in ("recompute", "keep"):
            raise ConfigError(
                f"ActivationMemory.attention_output must be 'recompute' or 'keep', got {self.attention_output!r}")
        if self.attention_dropout not in ("recompute", "off"):
            raise ConfigError(f"ActivationMemory.attention_dropout must be 'recompute' or 'off', "
                              f"got {self.attention_dropout!r}")
        if self.dense not in ("bf16", "off"):
            raise ConfigError(f"ActivationMemory.dense must be 'bf16' or 'off', got {self.dense!r}")
        if self.maxpool not in ("indices", "off"):
            raise ConfigError(f"ActivationMemory.maxpool must be 'indices' or 'off', got {self.maxpool!r}")
        if self.weight_grad not in WEIGHT_GRAD:
            raise ConfigError(
                f"ActivationMemory.weight_grad must be one of {list(WEIGHT_GRAD)}, got {self.weight_grad!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ConfigError(f"ActivationMemory.block_size must be an int, got {self.block_size!r}")
        sfx.check_range(self, "block_size", self.block_size, 16, 65536)
