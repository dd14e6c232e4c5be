"""Attention with dropout (or a mask) that keeps q, k, v, not its ``[*batch, Lq, Lk]`` scores.

Why: on a CPU no fused attention kernel takes dropout, so ``F.scaled_dot_product_attention(...,
dropout_p=0.1)`` (Hugging Face BERT, GPT-2, ViT in training) runs the math path, which keeps
three tensors of ``batch * heads * Lq * Lk`` elements for backward (the probabilities, the
dropout mask, the dropped probabilities), in fp32 even for bf16 operands (the CPU math path
computes in fp32 and keeps fp32 copies of q, k, v too). They grow with the square of the
sequence length: a ratio planned at one length no longer holds at a longer one.

The op here keeps q, k, v (as they are, or compressed) and an int64 seed (an input, drawn by
the op module, so the op itself is deterministic). Forward computes the
math attention with a dropout mask drawn from a generator seeded with that seed; backward
recomputes the probabilities from q, k and the mask, regenerates the same dropout mask from
the seed, and applies the math path's backward formulas (``actmem_sdpa_dropout_backward``, an
op of its own so that ``torch.compile`` traces through it). The seed is drawn from the default
CPU generator, so ``torch.manual_seed`` makes a run reproducible; the dropout pattern differs from
the dense op's (a different draw of the same distribution). Gradients are exact for the mask
the forward used (float reassociation aside); the cost is one more ``q @ k^T`` and softmax per
attention in backward.

Masked rows that keep no key give zero probabilities (``torch._safe_softmax``), as the math
path does. A mask that needs a gradient runs the dense op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sparsify_fx.passes.activation_memory.modules import _recording
from sparsify_fx.passes.activation_memory.ops import (
    _compressible,
    _fake_payload,
    compress,
    decompress,
)
from sparsify_fx.passes.kernels.op_autograd import in_backward, owned, register_autograd

import sparsify_fx as sfx
from sparsify_fx import autocast_region

__all__ = ["ActMemAttentionDropout", "actmem_sdpa_dropout", "math_dtype"]

_LOW = (torch.float16, torch.bfloat16)
_SAFE_SOFTMAX = getattr(torch, "_safe_softmax", None)


def math_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the math path computes in: fp32 for 2-byte operands on a CPU (as
    ``_scaled_dot_product_attention_math`` does), else the operands' own."""
    return torch.float32 if q.dtype in _LOW and q.device.type == "cpu" else q.dtype


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    if _SAFE_SOFTMAX is not None:
        return _SAFE_SOFTMAX(logits, -1)
    return torch.softmax(logits, -1).nan_to_num(0.0)  # (a fully masked row: NaN -> 0)


def _keep_scaled(seed: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout mask of ``seed`` as 0 or ``1 / (1 - p)``, shaped like ``like``: the same
    tensor in forward and backward."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(int(seed.item()))  # (a CPU tensor: no device sync)
    return torch.empty_like(like, memory_format=torch.contiguous_format).bernoulli_(
        1.0 - p, generator=generator).div_(1.0 - p)


def _probs(q, k, mask, is_causal: bool, scale: float | None) -> tuple[torch.Tensor, float]:
    dtype = math_dtype(q)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)).mul_(scale)
    if is_causal:
        rows, cols = logits.shape[-2:]
        logits.masked_fill_(~torch.ones(rows, cols, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.to(dtype)
    return _softmax(logits), scale


@torch.library.custom_op("sparsify_fx::actmem_sdpa_dropout", mutates_args=())
def _actmem_sdpa_dropout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, seed: torch.Tensor,
    dropout_p: float, is_causal: bool, scale: float | None, storage: str, block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    probs, _ = _probs(q, k, mask, is_causal, scale)
    if dropout_p > 0:
        probs.mul_(_keep_scaled(seed, probs, dropout_p))
    out = (probs @ v.to(probs.dtype)).to(q.dtype)
    payload = (*compress(q, storage, block), *compress(k, storage, block), *compress(v, storage, block)) \
        if storage != "exact" else tuple(q.new_empty(0) for _ in range(6))
    return (owned(out), *payload)


@_actmem_sdpa_dropout.register_fake
def _(q, k, v, mask, seed, dropout_p, is_causal, scale, storage, block):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    payload = (*_fake_payload(q, storage, block), *_fake_payload(k, storage, block),
               *_fake_payload(v, storage, block)) if storage != "exact" else tuple(q.new_empty(0) for _ in range(6))
    return (out, *payload)


@torch.library.custom_op("sparsify_fx::actmem_sdpa_dropout_backward", mutates_args=())
def _actmem_sdpa_dropout_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    seed: torch.Tensor, dropout_p: float, is_causal: bool, scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    probs, scale = _probs(q, k, mask, is_causal, scale)
    dtype = probs.dtype
    grad_out = grad_out.to(dtype)
    keep = _keep_scaled(seed, probs, dropout_p) if dropout_p > 0 else None
    dropped = probs * keep if keep is not None else probs
    grad_v = dropped.transpose(-2, -1) @ grad_out
    del dropped
    grad_probs = grad_out @ v.to(dtype).transpose(-2, -1)
    if keep is not None:
        grad_probs.mul_(keep)
        del keep
    grad_logits = probs.mul_(grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
    grad_q = (grad_logits @ k.to(dtype)).mul_(scale)
    grad_k = (grad_logits.transpose(-2, -1) @ q.to(dtype)).mul_(scale)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


@_actmem_sdpa_dropout_backward.register_fake
def _(grad_out, q, k, v, mask, seed, dropout_p, is_causal, scale):
    # (the real gradients are fresh matmul results: contiguous whatever q, k, v's layout)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output) -> None:
    q, k, v, mask, seed, dropout_p, is_causal, scale, storage = inputs[:9]
    ctx.compressed = storage != "exact"
    kept = output[1:] if ctx.compressed else (q, k, v, None, None, None)
    ctx.save_for_backward(seed, mask, *kept)
    ctx.shapes = [list(q.shape), list(k.shape), list(v.shape)]
    ctx.dtypes = (q.dtype, k.dtype, v.dtype)
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale


def _backward(ctx, grad_out, *_unused):
    seed, mask, *kept = ctx.saved_tensors
    if ctx.compressed:
        pq, sq, pk, sk, pv, sv = in_backward(grad_out, *kept)
        q, k, v = (decompress(p, s, shape, dtype) for p, s, shape, dtype in
                   zip((pq, pk, pv), (sq, sk, sv), ctx.shapes, ctx.dtypes))
    else:
        q, k, v = kept[:3]
    grads = torch.ops.sparsify_fx.actmem_sdpa_dropout_backward(
        grad_out, q, k, v, mask, seed, ctx.dropout_p, ctx.is_causal, ctx.scale)
    return (*grads, None, None, None, None, None, None, None)


actmem_sdpa_dropout = register_autograd(_actmem_sdpa_dropout, _backward, _setup)


class ActMemAttentionDropout(sfx.OpModule):
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)`` in
    training keeping q, k, v (``storage="exact"``: as they are, so gradients are exact;
    ``"bf16"`` / ``"int8"``: compressed) and a seed instead of the math path's probabilities
    and dropout mask; without grad recording it runs the original op.

    ``forward(q, k, v)`` or ``forward(q, k, v, attn_mask)``.
    """

    def __init__(self, dropout_p: float, is_causal: bool, scale: float | None, storage: str, block: int):
        super().__init__()
        self.dropout_p, self.is_causal, self.scale = dropout_p, is_causal, scale
        self.storage, self.block = storage, block
        #: under autocast q, k, v are cast first, and the casts are what "exact" keeps
        self.casts_operands = True
        #: ``"exact"`` keeps q, k, v as they are (the memory plan counts them dense, shared
        #: holders once); compressed forms report their bytes in the pass's Rewrite
        self.keeps_dense_inputs = storage == "exact"

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}, is_causal={self.is_causal}, scale={self.scale}, storage={self.storage}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if _recording(q, k, v) and q.dim() >= 2 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] \
                and (attn_mask is None or not attn_mask.requires_grad):
            with autocast_region(q.device.type) as cast:
                q, k, v, mask = cast(q), cast(k), cast(v), cast(attn_mask)
                if q.dtype == k.dtype == v.dtype and q.is_floating_point():
                    storage = self.storage if self.storage == "exact" or _compressible(q, self.storage) else "exact"
                    # (drawn from the default generator: torch.manual_seed makes a run reproducible)
                    seed = torch.randint(0, 2**62, (), dtype=torch.int64)
                    return actmem_sdpa_dropout(q, k, v, mask, seed, self.dropout_p, self.is_causal, self.scale,
                                               storage, self.block)[0]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p,
                                              is_causal=self.is_causal, scale=self.scale)
