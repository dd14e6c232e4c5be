"""SliceOut: slice-group analysis, the sliced ops against explicitly sliced autograd, the pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sparsify_fx.passes.sliceout import SliceOutBatchNorm, SliceOutDense, SliceWindow, window_width

import sparsify_fx as sfx

# ---------------------------------------------------------------- small models


class Chain(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, width), nn.Linear(width, width), nn.Linear(width, 4)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.fc3(self.drop(F.gelu(self.fc2(torch.relu(self.fc1(x)) * 0.5))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(self.fc2(h) + h)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], -1))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, embed: int = 16, heads: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.norm = nn.LayerNorm(embed)

    def forward(self, x):
        return self.norm(self.attn(x, x, x, need_weights=False)[0])


class SeparateQKV(nn.Module):
    """HF-style attention: separate q/k/v Linears, view into heads, reshape back."""

    def __init__(self, embed: int = 16, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, embed // heads
        self.k, self.q, self.v, self.o = (nn.Linear(embed, embed) for _ in range(4))
        self.norm = nn.LayerNorm(embed)

    def forward(self, x):
        b, n, e = x.shape
        k = self.k(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # k computed first
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, e)
        return self.norm(self.o(o))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x, n_rep: int):
    b, kv, t, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


class LlamaAttention(nn.Module):
    """Llama-style: separate q/k/v, view(B, T, -1, d), RoPE, grouped-query attention, a mask."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, seq: int):
        super().__init__()
        self.d, self.n_rep = hidden // heads, heads // kv_heads
        self.q = nn.Linear(hidden, heads * self.d, bias=False)
        self.k = nn.Linear(hidden, kv_heads * self.d, bias=False)
        self.v = nn.Linear(hidden, kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, hidden, bias=False)
        angles = torch.arange(seq)[:, None] * torch.arange(1, self.d // 2 + 1)[None] / seq
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, -1))
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, -1))
        self.register_buffer("mask", torch.ones(seq, seq, dtype=torch.bool).tril()[None, None])

    def heads(self, h, proj):
        b, t, _ = h.shape
        return proj(h).view(b, t, -1, self.d).transpose(1, 2)

    def forward(self, h):
        q, k, v = self.heads(h, self.q), self.heads(h, self.k), self.heads(h, self.v)
        q = q * self.cos + rotate_half(q) * self.sin
        k = k * self.cos + rotate_half(k) * self.sin
        o = F.scaled_dot_product_attention(q, repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep), attn_mask=self.mask)
        return self.o(o.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate, self.up = nn.Linear(hidden, inner, bias=False), nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, h):
        return self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaBlock(nn.Module):
    """RMSNorm -> attention -> residual -> RMSNorm -> SwiGLU MLP -> residual (pre-norm)."""

    def __init__(self, hidden: int = 32, heads: int = 4, kv_heads: int = 2, inner: int = 64, seq: int = 6):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(hidden), RMSNorm(hidden)
        self.attn = LlamaAttention(hidden, heads, kv_heads, seq)
        self.mlp = SwiGLU(hidden, inner)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _groups(model: nn.Module, x: torch.Tensor) -> sfx.SliceGroupAnalysis:
    cap = sfx.capture(model, example_inputs=(x,))
    sfx.ShapeRecorder(cap.graph_module).run(x)
    return sfx.find_slice_groups(cap.graph_module)


def _windows(module: nn.Module) -> list[SliceWindow]:
    return [m for m in module.modules() if isinstance(m, SliceWindow)]


# ---------------------------------------------------------------- slice groups


def test_groups_mlp_chain():
    analysis = _groups(Chain(), torch.randn(4, 8))
    groups = {g.module: g for g in analysis.groups}
    assert set(groups) == {"fc1", "fc2"}
    assert [c.weight for c in groups["fc1"].consumers] == ["fc2.weight"]
    assert [c.weight for c in groups["fc2"].consumers] == ["fc3.weight"]
    assert groups["fc1"].kind == "channels" and groups["fc1"].units == 32
    # relu and the scalar mul pass the window through; gelu and dropout too
    assert len(groups["fc1"].passthrough) == 2 and len(groups["fc2"].passthrough) == 2
    [last] = analysis.forbidden
    assert last.module == "fc3" and "graph output" in last.reason


def test_groups_residual_add_forbids():
    analysis = _groups(Residual(), torch.randn(4, 16))
    assert analysis.groups == []
    reasons = {f.module: f.reason for f in analysis.forbidden}
    assert "residual add" in reasons["fc1"] and "%add" in reasons["fc1"]
    assert "residual add" in reasons["fc2"]


def test_groups_concat_forbids():
    analysis = _groups(Concat(), torch.randn(4, 8))
    assert analysis.groups == []
    reasons = {f.module: f.reason for f in analysis.forbidden}
    assert "concatenation" in reasons["a"] and "concatenation" in reasons["b"]
    assert "%cat" in reasons["a"]


def test_groups_conv_batchnorm_pool():
    analysis = _groups(ConvBN(), torch.randn(2, 3, 8, 8))
    groups = {g.module: g for g in analysis.groups}
    assert set(groups) == {"conv1", "conv2"}
    assert [str(n.target) for n in groups["conv1"].norms] == ["bn1"]
    assert [c.weight for c in groups["conv1"].consumers] == ["conv2.weight"]
    # conv2 -> bn2 -> relu -> mean((2, 3)) -> Linear: the channel dim survives the reduction
    assert [c.weight for c in groups["conv2"].consumers] == ["head.weight"]


def test_groups_attention_heads():
    analysis = _groups(Attention(), torch.randn(2, 5, 16))
    [group] = analysis.groups
    assert (group.kind, group.units, group.unit_size) == ("heads", 4, 4)
    [producer] = group.producers
    assert producer.weight == "attn.in_proj_weight" and producer.offsets == (0, 16, 32)
    assert [c.weight for c in group.consumers] == ["attn.out_proj.weight"]
    # each unflatten(-1, (4, 4)) gets its head count freed: unflatten(-1, (-1, 4)) in the rewrite
    assert [(n.target, path) for n, path in group.resizes] == [("unflatten", (2, 0))] * 3
    # the out-projection feeds a LayerNorm over its units
    [out] = analysis.forbidden
    assert out.module == "attn.out_proj"


def test_groups_separate_qkv_heads():
    analysis = _groups(SeparateQKV(), torch.randn(2, 5, 16))
    [group] = analysis.groups
    assert (group.kind, group.units, group.unit_size) == ("heads", 4, 4)
    assert [p.weight for p in group.producers] == ["k.weight", "q.weight", "v.weight"]  # graph order
    assert [p.unit_size for p in group.producers] == [4, 4, 4]
    assert [(c.weight, c.unit_size) for c in group.consumers] == [("o.weight", 4)]
    # view(b, n, 4, 4): the literal head count; reshape(b, n, e): e (read from x.shape) is the full width
    assert [(n.target, path) for n, path in group.resizes] == [("view", (3,))] * 3 + [("reshape", (3,))]
    assert [f.module for f in analysis.forbidden] == ["o"]


def test_groups_layernorm_forbids():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    analysis = _groups(model, torch.randn(4, 8))
    assert analysis.groups == []
    assert "LayerNorm normalizes over the sliced units" in analysis.forbidden[0].reason


# ---------------------------------------------------------------- sliced ops vs autograd


def _grads(fn, tensors, seed=1):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))
    return out.detach(), [t.grad.clone() for t in tensors]


def _sparsified(model, x, **kw):
    config = sfx.SliceOut(**{"p": 0.5, "align": 8, "skip_first_last": False, **kw})
    return sfx.sparsify(model, config, example_inputs=(x,))


def test_mlp_grads_match_explicitly_sliced_model():
    model, x = Chain(), torch.randn(6, 8)
    fast = _sparsified(model, x)
    win = {w.name: w for w in _windows(fast)}
    assert {n: w.width for n, w in win.items()} == {"fc1": 16, "fc2": 16}
    win["fc1"].fixed, win["fc2"].fixed = 8, 16
    params = list(model.parameters())
    out, grads = _grads(lambda: fast.train()(x), params)

    def reference():
        h = torch.relu(F.linear(x, model.fc1.weight[8:24], model.fc1.bias[8:24])) * 0.5
        h = F.gelu(F.linear(h * 2.0, model.fc2.weight[16:32, 8:24], model.fc2.bias[16:32]))
        return F.linear(h * 2.0, model.fc3.weight[:, 16:32], model.fc3.bias)

    ref, ref_grads = _grads(reference, params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert model.fc2.weight.grad[:16].abs().sum() == 0  # outside the window: zero


def test_conv_bn_grads_and_running_stats_match_explicitly_sliced_model():
    model, x = ConvBN(), torch.randn(2, 3, 8, 8)
    fast = _sparsified(model, x, include=("conv1", "conv2"))
    win = {w.name: w for w in _windows(fast)}
    assert set(win) == {"conv1"}  # conv2's group reaches head, not selected by include
    win["conv1"].fixed = 8
    bn1 = model.bn1
    mean0, var0 = bn1.running_mean.clone(), bn1.running_var.clone()
    params = list(model.parameters())
    out, grads = _grads(lambda: fast.train()(x), params)
    mean1, var1 = bn1.running_mean.clone(), bn1.running_var.clone()
    assert int(bn1.num_batches_tracked) == 1
    torch.testing.assert_close(mean1[:8], mean0[:8], rtol=0, atol=0)  # dropped channels: untouched
    assert not torch.equal(mean1[8:], mean0[8:])

    def reference():
        ref_mean, ref_var = mean0[8:].clone(), var0[8:].clone()
        h = F.conv2d(x, model.conv1.weight[8:], model.conv1.bias[8:], padding=1)
        h = F.batch_norm(h, ref_mean, ref_var, bn1.weight[8:], bn1.bias[8:], True, bn1.momentum, bn1.eps)
        reference.stats = (ref_mean, ref_var)
        h = model.pool(torch.relu(h))
        h = F.conv2d(h * 2.0, model.conv2.weight[:, 8:], None, padding=1)
        h = torch.relu(model.bn2(h))
        return model.head(h.mean((2, 3)))

    ref, ref_grads = _grads(reference, params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mean1[8:], reference.stats[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var1[8:], reference.stats[1], rtol=1e-6, atol=1e-7)


def test_attention_head_grads_match_explicitly_sliced_model():
    model, x = Attention(), torch.randn(2, 5, 16)
    fast = _sparsified(model, x)
    [win] = _windows(fast)
    assert (win.units, win.width) == (4, 2)
    win.fixed = 1  # heads 1 and 2: rows 4..12 of each of q, k, v
    params = list(model.parameters())
    out, grads = _grads(lambda: fast.train()(x), params)
    attn = model.attn
    rows = torch.cat([torch.arange(4, 12) + s for s in (0, 16, 32)])

    def reference():
        qkv = F.linear(x, attn.in_proj_weight[rows], attn.in_proj_bias[rows])
        q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in qkv.chunk(3, -1))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return model.norm(F.linear(o * 2.0, attn.out_proj.weight[:, 4:12], attn.out_proj.bias))

    ref, ref_grads = _grads(reference, params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_separate_qkv_grads_match_explicitly_sliced_model():
    model, x = SeparateQKV(), torch.randn(2, 5, 16)
    fast = _sparsified(model, x)
    assert sfx.verify(model, fast, example_inputs=(x,)).ok
    [win] = _windows(fast)
    win.fixed = 2  # heads 2 and 3: rows / columns 8..16
    params = list(model.parameters())
    out, grads = _grads(lambda: fast.train()(x), params)

    def reference():
        def heads(lin):
            return F.linear(x, lin.weight[8:], lin.bias[8:]).view(2, 5, 2, 4).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(model.q), heads(model.k), heads(model.v))
        o = o.transpose(1, 2).reshape(2, 5, 8)
        return model.norm(F.linear(o * 2.0, model.o.weight[:, 8:], model.o.bias))

    ref, ref_grads = _grads(reference, params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


LLAMA_CAPTURES = ["symbolic_trace", "export"]


def _llama(capture: str, kv_heads: int = 2, **config):
    torch.manual_seed(0)
    model, x = LlamaBlock(kv_heads=kv_heads), torch.randn(2, 6, 32)
    fast = sfx.sparsify(model, sfx.SliceOut(**{"p": 0.5, "skip_first_last": False, **config}),
                        example_inputs=(x,), capture_methods=(capture,))
    assert fast.sfx_record.capture_method == capture
    return model, fast, x


@pytest.mark.parametrize("capture", LLAMA_CAPTURES)
def test_groups_llama_swiglu_and_grouped_query_heads(capture):
    torch.manual_seed(0)
    model, x = LlamaBlock(), torch.randn(2, 6, 32)
    cap = sfx.capture(model, (x,), methods=(capture,))
    sfx.ShapeRecorder(cap.graph_module).run(x)
    analysis = sfx.find_slice_groups(cap.graph_module)
    groups = {g.module: g for g in analysis.groups}
    assert set(groups) == {"attn", "mlp"}
    heads, mlp = groups["attn"], groups["mlp"]
    # grouped-query attention: the units are the 2 key/value groups, each with 2 query heads of 8
    assert (heads.kind, heads.units) == ("heads", 2)
    assert {p.weight: p.unit_size for p in heads.producers} == {"attn.q.weight": 16, "attn.k.weight": 8,
                                                                "attn.v.weight": 8}
    assert [(c.weight, c.unit_size) for c in heads.consumers] == [("attn.o.weight", 16)]
    # repeat_kv's expand(b, 2, n_rep, t, d) and reshape(b, 4, t, d) spell the group count: freed
    assert sorted(n.target for n, _ in heads.resizes) == ["expand", "expand", "reshape", "reshape"]
    # SwiGLU: gate and up are multiplied, so they take one window; down consumes it
    assert (mlp.kind, mlp.units) == ("channels", 64)
    assert [p.weight for p in mlp.producers] == ["mlp.gate.weight", "mlp.up.weight"]
    assert [c.weight for c in mlp.consumers] == ["mlp.down.weight"]
    reasons = {f.module: f.reason for f in analysis.forbidden}
    assert set(reasons) == {"attn.o", "mlp.down"}
    assert all("residual add" in r for r in reasons.values())


@pytest.mark.parametrize("capture", LLAMA_CAPTURES)
def test_llama_block_eval_exact_and_report(capture):
    model, fast, x = _llama(capture)
    assert fast.sfx_record.verification.ok
    fast.train()
    fast(x).pow(2).mean().backward()  # a training step leaves eval exact
    fast.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    report = sfx.explain(fast)
    rewrites = {r.module: r.details for r in report.rewrites}
    assert {m: (d["units"], d["width"]) for m, d in rewrites.items()} == {"attn": (2, 1), "mlp": (64, 32)}
    skipped = {s.module: s.reason for s in report.skipped}
    assert set(skipped) == {"attn.o", "mlp.down"}
    # every dense layer is named: sliced (rows / columns) or skipped with its reason
    named = " ".join(" ".join(d["sliced"]) for d in rewrites.values()) + " " + " ".join(skipped)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert name in named, name


@pytest.mark.parametrize("capture", LLAMA_CAPTURES)
def test_llama_block_grads_match_explicitly_sliced_model(capture):
    model, fast, x = _llama(capture)
    win = {w.name: w for w in _windows(fast)}
    assert {n: (w.units, w.width) for n, w in win.items()} == {"attn": (2, 1), "mlp": (64, 32)}
    win["attn"].fixed, win["mlp"].fixed = 1, 24  # key/value group 1 (query heads 2, 3); units 24..56
    params = list(model.parameters())
    out, grads = _grads(lambda: fast.train()(x), params)
    attn, mlp = model.attn, model.mlp

    def reference():
        h = model.norm1(x)

        def heads(w):
            return F.linear(h, w).view(2, 6, -1, 8).transpose(1, 2)

        q, k, v = heads(attn.q.weight[16:32]), heads(attn.k.weight[8:16]), heads(attn.v.weight[8:16])
        q = q * attn.cos + rotate_half(q) * attn.sin
        k = k * attn.cos + rotate_half(k) * attn.sin
        o = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=attn.mask)
        y = x + F.linear(o.transpose(1, 2).reshape(2, 6, 16) * 2.0, attn.o.weight[:, 16:32])
        h = model.norm2(y)
        gated = F.silu(F.linear(h, mlp.gate.weight[24:56])) * F.linear(h, mlp.up.weight[24:56])
        return y + F.linear(gated * 2.0, mlp.down.weight[:, 24:56])

    ref, ref_grads = _grads(reference, params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert attn.k.weight.grad[:8].abs().sum() == 0 and mlp.up.weight.grad[:24].abs().sum() == 0


@pytest.mark.parametrize("capture", LLAMA_CAPTURES)
def test_llama_block_single_kv_head_is_reported(capture):
    # one key/value head: no whole group of heads to drop; the MLP is still sliced
    model, fast, x = _llama(capture, kv_heads=1)
    report = sfx.explain(fast)
    assert [r.module for r in report.rewrites] == ["mlp"]
    skipped = {s.module: s.reason for s in report.skipped}
    assert set(skipped) == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.down"}
    for name in ("attn.k", "attn.v"):
        assert "a single head or key/value group" in skipped[name]
    assert "not sliced with the same heads" in skipped["attn.q"] and "attn.k" in skipped["attn.q"]
    assert fast.sfx_record.verification.ok


def test_op_modules_have_no_state_and_eval_is_dense():
    model, x = ConvBN(), torch.randn(2, 3, 8, 8)
    fast = _sparsified(model, x)
    ops = [m for m in fast.modules() if isinstance(m, (SliceWindow, SliceOutDense, SliceOutBatchNorm))]
    assert ops and all(not list(m.parameters()) and not list(m.buffers()) for m in ops)
    assert list(fast.state_dict()) == list(model.state_dict())
    fast.eval()
    assert all(w() is None for w in _windows(fast))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x), rtol=0, atol=0)


# ---------------------------------------------------------------- eval exactness


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_eval_exact_small(name):
    model, x = (Chain(), torch.randn(4, 8)) if name == "mlp" else (ConvBN(), torch.randn(2, 3, 8, 8))
    fast = _sparsified(model, x, p=0.5)
    assert sfx.explain(fast).rewrites
    fast.train()
    fast(x).sum().backward()  # a training step must leave eval exact (running stats shared)
    assert sfx.verify(model, fast, example_inputs=(x,)).ok


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16"])
def test_eval_exact_and_training_step_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    kwargs = {"image_size": 32} if name == "vit_b_16" else {}
    model = getattr(torchvision.models, name)(num_classes=10, **kwargs)
    x = torch.randn(2, 3, 32, 32)
    fast = sfx.sparsify(model, sfx.SliceOut(p=0.25), example_inputs=(x,))
    record = fast.sfx_record
    assert record.verification.ok, record.verification.summary()
    kinds = {r.op for r in record.rewrites}
    assert kinds == ({"slice_group[channels]"} if name == "resnet18"
                     else {"slice_group[channels]", "slice_group[heads]"})
    assert len(record.rewrites) == (8 if name == "resnet18" else 24)
    fast.train()
    F.cross_entropy(fast(x), torch.tensor([1, 2])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert sfx.verify(model, fast, example_inputs=(x,)).ok


# ---------------------------------------------------------------- windows


def test_window_width_and_alignment():
    assert window_width(64, 0.25, 8) == 48
    assert window_width(64, 0.5, 8) == 32
    assert window_width(12, 0.25, 1) == 9
    assert window_width(20, 0.9, 8) == 8  # at least one aligned block
    win = SliceWindow(units=60, width=32, align=8, seed=0, name="g")
    assert win.positions == [0, 8, 16, 24, 28]  # 28 = 60 - 32: the tail stays reachable
    assert {win.start_at(s) for s in range(200)} == set(win.positions)


def test_windows_deterministic_under_seed():
    model, x = Chain(width=64), torch.randn(4, 8)
    a, b = _sparsified(model, x, seed=3), _sparsified(model, x, seed=3)
    c = _sparsified(model, x, seed=4)
    a.train(), b.train(), c.train()
    for _ in range(3):
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    seq = {w.name: [w.start_at(s) for s in range(20)] for w in _windows(a)}
    assert seq == {w.name: [w.start_at(s) for s in range(20)] for w in _windows(b)}
    assert seq != {w.name: [w.start_at(s) for s in range(20)] for w in _windows(c)}
    assert seq["fc1"] != seq["fc2"]  # groups draw independently
    assert all(w.step == 3 for w in _windows(a))


# ---------------------------------------------------------------- config and skips


@pytest.mark.parametrize(
    "kwargs,field",
    [({"p": 1.0}, "p"), ({"p": -0.1}, "p"), ({"p": "0.5"}, "p"), ({"align": 0}, "align"),
     ({"align": 2.5}, "align"), ({"seed": -1}, "seed"), ({"skip_first_last": "yes"}, "skip_first_last"),
     ({"heads": 1}, "heads")],
)
def test_config_validation(kwargs, field):
    with pytest.raises(sfx.ConfigError, match=f"SliceOut.{field}"):
        sfx.SliceOut(**kwargs)


def test_recipe_string():
    [config] = sfx.parse_recipe("sliceout:p=0.5,align=4")
    assert config == sfx.SliceOut(p=0.5, align=4)


def test_nothing_sliceable_reports_reasons():
    model, x = Residual(), torch.randn(4, 16)
    fast = sfx.sparsify(model, sfx.SliceOut(p=0.5, skip_first_last=False), example_inputs=(x,))
    report = sfx.explain(fast)
    assert report.rewrites == []
    reasons = {s.module: s.reason for s in report.skipped}
    assert "residual add" in reasons["fc1"] and "call_function[target=operator.add]" in reasons["fc1"]
    assert "graph output" in reasons["fc3"]


def test_skip_reasons_first_last_and_small_p():
    model, x = Chain(), torch.randn(4, 8)
    fast = sfx.sparsify(model, sfx.SliceOut(p=0.5), example_inputs=(x,))
    reasons = {s.module: s.reason for s in sfx.explain(fast).skipped}
    assert sfx.explain(fast).rewrites == []
    assert "first/last dense layer" in reasons["fc1"] and "first/last dense layer" in reasons["fc2"]
    fast = sfx.sparsify(model, sfx.SliceOut(p=0.05, skip_first_last=False), example_inputs=(x,))
    reasons = {s.module: s.reason for s in sfx.explain(fast).skipped}
    assert "window covers all 32 units" in reasons["fc1"]
    fast = sfx.sparsify(Attention(), sfx.SliceOut(heads=False, skip_first_last=False),
                        example_inputs=(torch.randn(2, 5, 16),))
    reasons = {s.module: s.reason for s in sfx.explain(fast).skipped}
    assert "heads=False" in reasons["attn"]


def test_custom_ops_opcheck():
    x, w, b = torch.randn(3, 8), torch.randn(12, 16, requires_grad=True), torch.randn(12, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsify_fx.sliceout_linear, (x.requires_grad_(), w, b, [2, 4, 8, 2], [4, 8], 2.0))
    xc, wc = torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(6, 8, 3, 3, requires_grad=True)
    bc = torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsify_fx.sliceout_conv,
                          (xc, wc, bc, [1, 3], [2, 4], 1.5, [1, 1], [1, 1], [1, 1]))
