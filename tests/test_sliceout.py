"""SliceOut: slice-group analysis, the sliced ops against explicitly sliced autograd, the pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx
from passes.sliceout import SliceOutBatchNorm, SliceOutDense, SliceWindow, window_width

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
    assert len(group.head_reshapes) == 3
    # the out-projection feeds a LayerNorm over its units
    [out] = analysis.forbidden
    assert out.module == "attn.out_proj"


def test_groups_separate_qkv_heads():
    analysis = _groups(SeparateQKV(), torch.randn(2, 5, 16))
    [group] = analysis.groups
    assert (group.kind, group.units, group.unit_size) == ("heads", 4, 4)
    assert [p.weight for p in group.producers] == ["q.weight", "k.weight", "v.weight"]
    assert [c.weight for c in group.consumers] == ["o.weight"]
    assert [n.target for n in group.head_reshapes] == ["view", "view", "view", "reshape"]
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
