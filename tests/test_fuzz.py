"""Property-based fuzzing: random architectures x random recipes (issue #9).

Each example builds a tiny random model -- an MLP (LayerNorm / BatchNorm, residuals, dropout,
token inputs), a CNN (1-3 spatial dims, strides, dilation, groups, every padding mode, "same"
padding, BN / GN / LN, pooling, residuals, concatenated side branches) or an attention block
(nn.MultiheadAttention with or without dropout, hand-written fused / separate q/k/v, SDPA or
explicit softmax) -- and a recipe of one to three passes (DropIT, ActivationMemory, BSR,
SliceOut, IsoFLOP; MemoryBudget last) with random hyper-parameters, and checks that

* ``sparsify`` succeeds; models whose forward tests shapes are captured per submodule or by
  export, the others whole (Dynamo, a compile per example, is kept out of the time budget);
* the original model is bit-identical afterwards (state, modes, hooks, attributes), and the
  result shares every state_dict tensor with it under the same keys;
* eval outputs equal the original's (exact recipes), verified by sparsify itself too;
* one training step gives finite gradients for every parameter the forward still reads;
* the report accounts for every Linear/Conv (rewritten or skipped with a reason) for each
  pass that rewrites dense layers.

Lossless settings must give the dense model's gradients; untraceable models given to
``capture`` must be captured or raise a ``SparsifyError`` that says why; recipe strings
round-trip. Profiles: ``ci`` (the default: 1000 examples in total, ~1 minute on one thread,
derandomized so CI is reproducible, no shrinking so a failure cannot stall CI; the failing
example and its blob are printed) and ``local`` (``HYPOTHESIS_PROFILE=local``: 10x more,
random, shrinking on).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from sparsify_fx.passes.iso_flop import parallel_branches

import sparsify_fx as sfx
from sparsify_fx.graph.form import DENSE_LAYER_TYPES

settings.register_profile(
    "ci",
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)
settings.register_profile(
    "local",
    max_examples=10000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)
_PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci")
                                if os.environ.get("HYPOTHESIS_PROFILE") in ("ci", "local") else "ci")


def _budget(fraction: float) -> settings:
    """This test's share of the profile's examples (the shares sum to 1)."""
    return settings(_PROFILE, max_examples=max(1, int(_PROFILE.max_examples * fraction)))


RTOL, ATOL = 1e-4, 1e-5  # float32 eval comparisons (IsoFLOP branches sum in another order)
# every architecture drawn is captured whole by symbolic_trace, or per submodule / by export
# where its code branches on shapes; Dynamo (a compile per example) stays out of the budget
_CHEAP_CAPTURE = ("symbolic_trace", "submodules", "export")

# ---------------------------------------------------------------- architectures

_ACTS = ("relu", "relu_inplace", "gelu", "gelu_tanh", "silu", "leaky", "tanh", "none", "f_relu", "f_gelu")


def _act(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "gelu": nn.GELU(),
        "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "leaky": nn.LeakyReLU(0.1),
        "tanh": nn.Tanh(), "none": nn.Identity(), "f_relu": _FunctionalAct("relu"),
        "f_gelu": _FunctionalAct("gelu"),
    }[name]


class _FunctionalAct(nn.Module):
    """An activation written as a function call (``F.relu`` / ``x.relu()`` spellings)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return x.relu() if self.kind == "relu" else F.gelu(x)


class FuzzMLP(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        dims = [spec["in"], *spec["widths"]]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=spec["bias"]) for a, b in zip(dims, dims[1:]))
        self.acts = nn.ModuleList(_act(a) for a in spec["acts"])
        norms = []
        for w in spec["widths"]:
            if spec["norm"] == "ln":
                norms.append(nn.LayerNorm(w))
            elif spec["norm"] == "bn" and not spec["seq"]:
                norms.append(nn.BatchNorm1d(w))
            else:
                norms.append(nn.Identity())
        self.norms = nn.ModuleList(norms)
        self.drop = nn.Dropout(spec["dropout"])
        self.head = nn.Linear(dims[-1], spec["out"])

    def forward(self, x):
        for lin, norm, act in zip(self.layers, self.norms, self.acts):
            h = act(norm(lin(x)))
            # a shape test in forward is untraceable: such models are captured per submodule
            same = h.shape == x.shape if self.spec["shape_check"] else lin.in_features == lin.out_features
            if self.spec["residual"] and same:
                h = h + x
            x = h
        return self.head(self.drop(x))


class _ConvBlock(nn.Module):
    def __init__(self, b: dict, ndim: int, shape_check: bool):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
        self.b, self.shape_check = b, shape_check
        self.conv = conv(b["cin"], b["cout"], b["k"], stride=b["stride"], padding=b["padding"],
                         dilation=b["dilation"], groups=b["groups"], bias=b["bias"],
                         padding_mode=b["padding_mode"])
        if b["norm"] == "bn":
            self.norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim](b["cout"])
        elif b["norm"] == "gn":
            self.norm = nn.GroupNorm(math.gcd(b["cout"], 2), b["cout"])
        elif b["norm"] == "ln":  # over channels and space
            self.norm = nn.LayerNorm([b["cout"], *(b["out_size"],) * ndim])
        else:
            self.norm = nn.Identity()
        self.act = _act(b["act"])
        if b["concat"]:
            self.side = conv(b["cin"], b["side"], 1)
        if b["pool"] == "max":
            self.pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[ndim](2)
        elif b["pool"] == "avg":
            self.pool = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[ndim](2)
        else:
            self.pool = nn.Identity()

    def forward(self, x):
        h = self.act(self.norm(self.conv(x)))
        if self.b["residual"]:
            h = h + x
        if self.b["concat"]:
            side = self.side(x)
            # a shape test in forward is untraceable: such models are captured per submodule
            resize = side.shape[2:] != h.shape[2:] if self.shape_check else self.b["in_size"] != self.b["out_size"]
            if resize:
                pool = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}[side.dim()]
                side = pool(side, h.shape[2:])
            h = torch.cat([h, side], dim=1)
        return self.pool(h)


class FuzzCNN(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.blocks = nn.Sequential(*[_ConvBlock(b, spec["ndim"], spec["shape_check"]) for b in spec["blocks"]])
        self.head = nn.Linear(spec["blocks"][-1]["cout_total"], spec["out"])

    def forward(self, x):
        h = self.blocks(x)
        h = h.flatten(2).mean(-1) if self.spec["head"] == "mean" else torch.flatten(F.adaptive_max_pool1d(h.flatten(2), 1), 1)
        return self.head(h)


class _SelfAttention(nn.Module):
    """Hand-written multi-head self-attention (fused or separate q/k/v projections)."""

    def __init__(self, dim: int, heads: int, fused: bool, sdpa: bool, bias: bool):
        super().__init__()
        self.heads, self.fused, self.sdpa = heads, fused, sdpa
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        else:
            self.q, self.k, self.v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        if self.fused:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (t(x).view(B, N, self.heads, C // self.heads).transpose(1, 2) for t in (self.q, self.k, self.v))
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
            o = attn.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class FuzzAttention(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        d = spec["dim"]
        self.embed = nn.Linear(spec["in"], d)
        self.norm1 = nn.LayerNorm(d)
        if spec["style"] == "mha":
            # attention dropout keeps MultiheadAttention one module (projections reported skipped)
            self.attn = nn.MultiheadAttention(d, spec["heads"], batch_first=spec["batch_first"], bias=spec["bias"],
                                              dropout=spec["attn_dropout"])
        else:
            self.attn = _SelfAttention(d, spec["heads"], spec["fused"], spec["sdpa"], spec["bias"])
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, spec["hidden"])
        self.act = _act(spec["act"])
        self.fc2 = nn.Linear(spec["hidden"], d)
        self.head = nn.Linear(d, spec["out"])

    def forward(self, x):
        x = self.embed(x)
        h = self.norm1(x)
        if self.spec["style"] == "mha":
            if not self.spec["batch_first"]:
                h = h.transpose(0, 1)
            a = self.attn(h, h, h, need_weights=False)[0]
            if not self.spec["batch_first"]:
                a = a.transpose(0, 1)
        else:
            a = self.attn(h)
        x = x + a
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


@st.composite
def mlp_specs(draw):
    depth = draw(st.integers(1, 3))
    seq = draw(st.booleans())
    spec = {
        "kind": "mlp", "in": draw(st.integers(4, 16)),
        "widths": draw(st.lists(st.sampled_from([4, 8, 12, 16]), min_size=depth, max_size=depth)),
        "acts": draw(st.lists(st.sampled_from(_ACTS), min_size=depth, max_size=depth)),
        "norm": draw(st.sampled_from(["none", "ln", "bn"])), "seq": seq,
        "residual": draw(st.booleans()), "bias": draw(st.booleans()),
        "dropout": draw(st.sampled_from([0.0, 0.0, 0.3])), "out": draw(st.integers(2, 6)),
        "batch": 2, "tokens": draw(st.integers(2, 4)) if seq else None,
        "shape_check": draw(st.booleans()),
    }
    return spec


@st.composite
def cnn_specs(draw):
    ndim = draw(st.sampled_from([2, 2, 1, 3]))
    size = draw(st.integers(3, 4) if ndim == 3 else st.integers(4, 8))
    cin = draw(st.integers(1, 4))
    spec = {"kind": "cnn", "ndim": ndim, "size": size, "in": cin, "blocks": [],
            "batch": 2, "out": draw(st.integers(2, 5)),
            "head": draw(st.sampled_from(["mean", "max"])), "shape_check": draw(st.booleans())}
    for _ in range(draw(st.integers(1, 3))):
        groups = draw(st.sampled_from([1, 1, 2, 4]))
        if cin % groups:
            groups = 1
        cout = groups * draw(st.integers(1, 16 // groups))
        k = draw(st.integers(1, 3))
        dilation = draw(st.sampled_from([1, 1, 2]))
        stride = draw(st.sampled_from([1, 1, 2]))
        padding_kind = draw(st.sampled_from(["int", "int", "same", "valid"]))
        padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
        reach = dilation * (k - 1)
        if padding_kind == "same" and stride == 1:
            padding = "same"
        elif padding_kind == "valid":
            padding = 0
        else:
            padding = draw(st.integers(0, max(0, reach // 2 + (k > 1))))
        pad_amount = reach if padding == "same" else (0 if padding == "valid" else padding)
        if padding_mode != "zeros" and (padding == "same" or pad_amount >= size or pad_amount == 0):
            padding_mode = "zeros"  # reflect needs pad < size; "same" with modes stays simple
        out_size = size if padding == "same" else (size + 2 * padding - reach - 1) // stride + 1
        if out_size < 1:
            k, dilation, stride, padding, padding_mode, reach, out_size = 1, 1, 1, 0, "zeros", 0, size
        residual = draw(st.booleans()) and cout == cin and out_size == size
        concat = draw(st.booleans())
        side = draw(st.integers(1, 4)) if concat else 0
        pool = draw(st.sampled_from(["none", "none", "max", "avg"])) if out_size >= 2 else "none"
        spec["blocks"].append({
            "cin": cin, "cout": cout, "k": k, "stride": stride, "padding": padding,
            "dilation": dilation, "groups": groups, "bias": draw(st.booleans()),
            "padding_mode": padding_mode, "norm": draw(st.sampled_from(["bn", "gn", "ln", "none"])),
            "in_size": size, "out_size": out_size,
            "act": draw(st.sampled_from(_ACTS)), "residual": residual, "concat": concat,
            "side": side, "pool": pool, "cout_total": cout + side,
        })
        cin = cout + side
        size = out_size // 2 if pool != "none" else out_size
    return spec


@st.composite
def attention_specs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    dim = heads * draw(st.sampled_from([2, 4]))
    return {
        "kind": "attn", "in": draw(st.integers(3, 8)), "dim": dim, "heads": heads,
        "style": draw(st.sampled_from(["mha", "custom"])), "batch_first": draw(st.booleans()),
        "fused": draw(st.booleans()), "sdpa": draw(st.booleans()), "bias": draw(st.booleans()),
        "hidden": draw(st.sampled_from([4, 8, 16])), "act": draw(st.sampled_from(_ACTS)),
        "out": draw(st.integers(2, 5)), "batch": 2, "tokens": draw(st.integers(2, 5)),
        "attn_dropout": draw(st.sampled_from([0.0, 0.0, 0.0, 0.2])),
    }


architectures = st.one_of(mlp_specs(), cnn_specs(), attention_specs())


def build(spec: dict, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if spec["kind"] == "mlp":
        model = FuzzMLP(spec)
        shape = (spec["batch"], spec["tokens"], spec["in"]) if spec["seq"] else (spec["batch"], spec["in"])
    elif spec["kind"] == "cnn":
        model = FuzzCNN(spec)
        shape = (spec["batch"], spec["in"]) + (spec["size"],) * spec["ndim"]
    else:
        model = FuzzAttention(spec)
        shape = (spec["batch"], spec["tokens"], spec["in"])
    # non-trivial running statistics so eval-mode BatchNorm is not the identity
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(shape)


# ---------------------------------------------------------------- recipes

_STORAGE = ["bf16", "int8", "off"]
_FUSABLE = [*_STORAGE, "recompute"]  # GELU / SiLU / LayerNorm feeding one Linear can be recomputed
_globs = st.sampled_from([(), ("head",), ("*.conv",), ("layers.0", "fc*"), ("blocks.*",)])


def _configs():
    dropit = st.builds(sfx.DropIT, keep=st.floats(0.01, 1.0), chunk_size=st.sampled_from([64, 100, 256, 16384]),
                       skip_first_last=st.booleans(), exclude=_globs)
    actmem = st.builds(sfx.ActivationMemory, relu=st.sampled_from(["bitmask", "off"]),
                       gelu=st.sampled_from(_FUSABLE), silu=st.sampled_from(_FUSABLE),
                       batchnorm=st.sampled_from(_STORAGE), layernorm=st.sampled_from(_FUSABLE),
                       block_size=st.sampled_from([16, 64, 256]))
    bsr = st.builds(sfx.BlockSparseActivations, block_size=st.integers(1, 8), density=st.floats(0.05, 1.0),
                    norm=st.sampled_from(["l1", "l2"]), skip_first_last=st.booleans(), exclude=_globs)
    sliceout = st.builds(sfx.SliceOut, p=st.floats(0.0, 0.9), align=st.integers(1, 4), seed=st.integers(0, 99),
                         skip_first_last=st.booleans(), heads=st.booleans())
    isoflop = st.builds(sfx.IsoFLOP, kind=st.sampled_from(["wide", "parallel", "factorized", "doped"]),
                        sparsity=st.floats(0.0, 0.9), init=st.sampled_from(["preserve", "random"]),
                        skip_first_last=st.booleans(), seed=st.integers(0, 99))
    return st.one_of(dropit, actmem, bsr, sliceout, isoflop)


# MemoryBudget plans the memory of the graph it is given, so it goes last (a later pass would
# change what it planned, and would only see its recomputed blocks as one opaque call);
# planning times ops on the example shapes, cheap on these tiny models (~0.05 s)
_memory_budget = st.builds(sfx.MemoryBudget, fraction=st.floats(0.05, 1.0), exact_only=st.booleans(),
                           keep=st.floats(0.01, 1.0))
recipes = st.tuples(st.lists(_configs(), min_size=0, max_size=3),
                    st.lists(_memory_budget, max_size=1)).map(lambda t: (t[0] + t[1])[:3]).filter(bool)


def _exact(config: sfx.PassConfig) -> bool:
    """Whether eval outputs must equal the original's (``IsoFLOP`` docstring: ``preserve`` is
    exact for ``wide``, and for ``parallel`` when ``round(1/(1-s)) * (1-s) >= 1``: fewer
    branches than that cannot hold every weight, so the smallest ones are dropped)."""
    if isinstance(config, sfx.IsoFLOP):
        if config.init != "preserve":
            return False
        if config.kind == "parallel":
            return parallel_branches(config.sparsity) * (1.0 - config.sparsity) >= 1.0 - 1e-6
        return config.kind == "wide"
    return True


_DENSE_PASSES = ("dropit", "bsr", "sliceout", "isoflop")

# ---------------------------------------------------------------- helpers


def fingerprint(model: nn.Module) -> dict:
    """Everything sparsify must leave alone: state (bitwise), modes, hooks, attributes."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "params": [(n, id(p), p.requires_grad, p.grad is None) for n, p in model.named_parameters()],
        "modules": [(n, type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
                     sorted(m.__dict__), sorted(m._modules)) for n, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = fingerprint(model)
    assert after["params"] == before["params"]
    assert after["modules"] == before["modules"]
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        w = after["state"][k]
        assert w.dtype == v.dtype and w.shape == v.shape and torch.equal(w, v), f"{k} changed"


def check_state_dict(model: nn.Module, fast: nn.Module) -> None:
    """The result keeps every original key, in order, holding the very same tensor; passes
    that add parameters (IsoFLOP) add keys under an ``sfx_ops`` container, never rename.

    Added keys may sit between original ones: when only submodules are captured, each traced
    submodule gets its own ``sfx_ops`` (``blocks.0.conv.sfx_ops.*``)."""
    original = model.state_dict(keep_vars=True)
    result = fast.state_dict(keep_vars=True)
    kept = [k for k in result if k in original]
    assert kept == list(original), "original state_dict keys missing or reordered"
    for k in original:
        assert result[k] is original[k], f"{k} is not shared with the original"
    added = [k for k in result if k not in original]
    assert all("sfx_ops." in k for k in added), added


def loss_of(out) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().square().mean() for t in leaves)


def dense_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, DENSE_LAYER_TYPES)]


def _mentioned(name: str, entries) -> bool:
    for e in entries:
        if e.module == name or name.startswith(e.module + ".") or (not e.module and name == ""):
            return True
    return False


def check_accounting(model: nn.Module, report: sfx.ExplainReport, configs: list[sfx.PassConfig]) -> None:
    """Each dense-layer pass names every Linear/Conv: rewritten or skipped with a reason
    (a layer an earlier pass of the recipe replaced is skipped as "already rewritten")."""
    for s in report.skipped:
        assert s.reason and s.reason.strip(), s
    for config in configs:
        name = config.recipe_name
        mine = [r for r in report.rewrites if r.pass_name == name] + [s for s in report.skipped if s.pass_name == name]
        if name in _DENSE_PASSES:
            for layer in dense_layers(model):
                assert _mentioned(layer, mine), (
                    f"{name}: layer {layer!r} neither rewritten nor skipped with a reason")


def _unused_parameters(report: sfx.ExplainReport) -> set[str]:
    return {n for r in report.rewrites for n in r.details.get("unused_parameters", ())}


# ---------------------------------------------------------------- properties


@_budget(0.6)
@given(spec=architectures, configs=recipes, seed=st.integers(0, 2**16))
def test_random_architecture_and_recipe(spec, configs, seed):
    note(f"recipe: {[c.describe() for c in configs]}")
    model, x = build(spec, seed)
    with torch.no_grad():
        model.eval()
        expected = model(x)
        model.train()
    before = fingerprint(model)
    exact = all(_exact(c) for c in configs)

    fast = sfx.sparsify(model, configs, example_inputs=(x,), verify=exact, capture_methods=_CHEAP_CAPTURE)

    event(f"capture: {fast.sfx_record.capture_method}")
    # 1. nothing lost: the original is bit-identical and still computes the same thing
    assert_unchanged(model, before)
    check_state_dict(model, fast)
    report = sfx.explain(fast)
    assert report.verification is None or report.verification.startswith("ok"), report.verification

    # 2. eval outputs equal the original's
    fast.eval()
    with torch.no_grad():
        got = fast(x)
    if exact:
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    else:
        assert got.shape == expected.shape and torch.isfinite(got).all()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    model.train()

    # 3. the report accounts for every Linear/Conv
    check_accounting(model, report, configs)

    # 4. a training step: finite gradients for every parameter the forward reads
    fast.train()
    torch.manual_seed(seed)
    loss = loss_of(fast(x))
    assert torch.isfinite(loss)
    loss.backward()
    unused = _unused_parameters(report)
    for name, p in model.named_parameters():
        if name in unused:
            continue
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
    for name, p in fast.named_parameters():
        if "sfx_ops." in name and p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@_budget(0.15)
@given(spec=architectures, keep_all=st.sampled_from(["dropit", "bsr", "actmem", "budget"]),
       fraction=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_lossless_settings_give_dense_gradients(spec, keep_all, fraction, seed):
    """DropIT(keep=1), BSR(density=1), ActivationMemory with relu bit masks only and
    MemoryBudget(exact_only=True) are exact in training too: outputs and gradients equal the
    dense model's."""
    config = {
        "dropit": sfx.DropIT(keep=1.0, skip_first_last=False),
        "bsr": sfx.BlockSparseActivations(block_size=2, density=1.0, skip_first_last=False),
        "actmem": sfx.ActivationMemory(gelu="off", silu="off", batchnorm="off", layernorm="off"),
        "budget": sfx.MemoryBudget(fraction=fraction, exact_only=True),
    }[keep_all]
    model, x = build(spec, seed)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # the same random mask cannot be drawn twice
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    reference = copy.deepcopy(model)
    fast = sfx.sparsify(model, config, example_inputs=(x,), capture_methods=_CHEAP_CAPTURE)
    fast.train()
    reference.train()
    out, ref = fast(x), reference(x)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    loss_of(out).backward()
    loss_of(ref).backward()
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


class _ValueBranch(nn.Module):
    """Branches on a tensor value at the root: symbolic_trace cannot capture it."""

    def __init__(self, width: int, raw: bool):
        super().__init__()
        self.raw = raw
        if raw:
            self.w1 = nn.Parameter(torch.randn(width, width) * 0.3)
            self.w2 = nn.Parameter(torch.randn(width, 3) * 0.3)
        else:
            self.a = nn.Linear(width, width)
            self.b = nn.Linear(width, 3)

    def forward(self, x):
        h = x @ self.w1 if self.raw else self.a(x)
        if h.sum() > 0:
            h = -h
        return torch.relu(h) @ self.w2 if self.raw else self.b(torch.relu(h))


class _ShapeBranch(_ValueBranch):
    def forward(self, x):
        if x.shape[0] > 2:
            x = x * 2
        return super().forward(x)


@_budget(0.1)
@given(width=st.sampled_from([4, 8]), raw=st.booleans(), shape_branch=st.booleans(),
       with_inputs=st.booleans(), method_subset=st.sampled_from([None, ("symbolic_trace",), ("symbolic_trace", "submodules")]),
       seed=st.integers(0, 99))
def test_capture_succeeds_or_explains(width, raw, shape_branch, with_inputs, method_subset, seed):
    torch.manual_seed(seed)
    model = (_ShapeBranch if shape_branch else _ValueBranch)(width, raw)
    x = torch.randn(2, width)
    before = fingerprint(model)
    kwargs = {"methods": method_subset} if method_subset else {}
    try:
        cap = sfx.capture(model, (x,) if with_inputs else None, **kwargs)
    except sfx.SparsifyError as e:
        assert isinstance(e, sfx.CaptureError)
        assert type(model).__name__ in str(e) and e.failures, str(e)
        assert all(why for why in e.failures.values())
        assert "example_inputs" in str(e) or "torch.fx.wrap" in str(e)
    else:
        assert cap.method in sfx.CAPTURE_METHODS
        assert set(cap.failures) <= set(sfx.CAPTURE_METHODS)
        if with_inputs:
            cap.graph_module.eval()
            model.eval()
            with torch.no_grad():
                torch.testing.assert_close(cap.graph_module(x), model(x), rtol=RTOL, atol=ATOL)
            model.train()
    assert_unchanged(model, before)


@_budget(0.15)
@given(configs=recipes)
def test_recipe_strings_round_trip(configs):
    """``describe()`` of any config parses back to an equal config (recipe strings are data)."""
    text = "+".join(c.describe() for c in configs)
    parsed = sfx.parse_recipe(text)
    assert parsed == configs, text
    assert sfx.resolve_recipe(text) == configs


@pytest.mark.parametrize("case", ["after_dropit", "mha_with_dropout", "after_fused_actmem"])
def test_passes_name_layers_they_cannot_see(case):
    """Regressions found by the fuzzer: SliceOut once skipped silently the dense ops it could
    not match (op modules of earlier passes, modules kept as one call), and a Linear fused
    into an ActivationMemory 'recompute' op was skipped under its activation's name."""
    if case == "after_dropit":
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        recipe = [sfx.DropIT(keep=0.5, skip_first_last=False), sfx.SliceOut(p=0.5, skip_first_last=False)]
        x, hidden = torch.randn(2, 4), ["0", "2"]
    else:
        model = FuzzAttention({"in": 4, "dim": 4, "heads": 2, "style": "mha", "batch_first": True,
                               "bias": True, "hidden": 8, "act": "relu", "out": 2, "attn_dropout": 0.2})
        recipe = [sfx.SliceOut(p=0.5, skip_first_last=False)]
        x, hidden = torch.randn(2, 3, 4), ["attn.out_proj"]
    if case == "after_fused_actmem":
        model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
        recipe = [sfx.ActivationMemory(gelu="recompute"), sfx.SliceOut(p=0.5, skip_first_last=False),
                  sfx.DropIT(keep=0.5, skip_first_last=False)]
        x, hidden = torch.randn(2, 4), ["2"]
    report = sfx.explain(sfx.sparsify(model, recipe, example_inputs=(x,)))
    for config in recipe[1:] if case == "after_fused_actmem" else recipe:
        mine = [e for e in report.rewrites + report.skipped if e.pass_name == config.recipe_name]
        for layer in hidden:
            assert _mentioned(layer, mine), (config.recipe_name, layer)
