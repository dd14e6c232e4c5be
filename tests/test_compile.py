"""torch.compile: the ``sparsify_fx`` backend (every pass, graph breaks, AOTAutograd and
Inductor on CPU) and compiling a module made by ``sfx.sparsify``.

Inductor compiles are slow on CPU: the models are tiny and every pass is exercised in one
model, so the whole file compiles a handful of graphs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Net(nn.Module):
    """Conv/ReLU/Conv/BN/GELU, a graph break, then Linear/LayerNorm/SiLU: every pass has a target."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.ln = nn.LayerNorm(32)
        self.fc3 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        # (BatchNorm stays functional in Dynamo graphs: SliceOut groups do not cross it there)
        x = torch.relu(self.c1(x))
        x = F.gelu(self.bn(self.c2(x))).mean((2, 3))
        torch._dynamo.graph_break()  # two Dynamo graphs: both must be rewritten
        x = torch.relu(self.fc1(x))
        x = F.silu(self.ln(self.fc2(x)))
        return self.head(torch.relu(self.fc3(x)))


SLICEOUT = sfx.SliceOut(p=0.5, skip_first_last=False, include=["c1", "c2"])
# every pass that keeps the parameter set, in one recipe, each on its own layers (SliceOut's
# per-step window draw runs in Python: inner="eager" only; IsoFLOP adds parameters: compile
# the sparsified module instead)
PER_GRAPH = [
    sfx.BlockSparseActivations(block_size=8, density=0.5, include=["fc2"]),
    sfx.DropIT(keep=0.5, include=["fc1", "fc3", "head"]),
    sfx.ActivationMemory(dense="bf16"),  # its bf16 conv input on c2 (c1 reads the graph input)
]


def _train_steps(model: nn.Module, run, steps: int) -> tuple[list, list]:
    """``steps`` SGD steps of ``run`` on ``model``; returns outputs and gradients per step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outs, grads = [], []
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        opt.zero_grad()
        torch.manual_seed(3)  # the sparse ops' own sampling, identical for both runs
        out = run(x)
        out.pow(2).mean().backward()
        outs.append(out.detach().clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return outs, grads


@pytest.mark.parametrize("inner", ["aot_eager", "inductor", "cudagraphs"])  # cudagraphs: AOT on a CPU
def test_every_pass_trains_through_inner_backend_like_eager(inner):
    """The compiled rewrite trains like the rewrite run eagerly, step after step, on both
    Dynamo graphs, and eval outputs equal the original model's."""
    torch.manual_seed(0)
    reference, model = Net(), Net()
    model.load_state_dict(reference.state_dict())
    eager = torch.compile(reference, backend=sfx.backend(PER_GRAPH, inner="eager"))
    to_inner = sfx.backend(PER_GRAPH, inner=inner)
    compiled = torch.compile(model, backend=to_inner)
    ref_outs, ref_grads = _train_steps(reference, eager, steps=3)
    outs, grads = _train_steps(model, compiled, steps=3)
    for step, (a, b) in enumerate(zip(outs, ref_outs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"output of step {step}")
    for step, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.keys() == r.keys() == {n for n, _ in model.named_parameters()}
        for name in r:
            torch.testing.assert_close(g[name], r[name], rtol=1e-3, atol=1e-4, msg=f"{name} step {step}")
    # both graphs were rewritten by every pass (the graph break does not hide layers)
    assert len(to_inner.results) == 2
    rewritten = {r.module for results in to_inner.results for res in results for r in res.rewrites}
    assert {"fc2", "fc3"} <= rewritten
    passes = {r.pass_name for results in to_inner.results for res in results for r in res.rewrites}
    assert passes == {"bsr", "dropit", "actmem"}, passes
    bf16_inputs = {r.op for results in to_inner.results for res in results for r in res.rewrites
                   if r.pass_name == "actmem" and r.details.get("storage") == "bf16" and r.op.startswith("conv")}
    assert bf16_inputs == {"conv2d"}, bf16_inputs
    # eval: a new graph (Dynamo guards on the mode) running the original dense ops
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    # eval with grad enabled still runs the exact ops (mode comes from the model, not grad mode)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_backend_by_name_default_recipe_trains_and_matches_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    compiled = torch.compile(model, backend="sparsify_fx")  # DropIT(keep=0.1) + Inductor
    x = torch.randn(16, 8)
    before = model[2].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled(x).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, model[2].weight.detach())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_sliceout_in_backend_runs_eagerly_and_is_refused_under_aot():
    torch.manual_seed(0)
    model = Net()
    # per-graph SliceOut runs with inner="eager" (the window draw stays Python) ...
    eager = torch.compile(model, backend=sfx.backend([SLICEOUT], inner="eager"))
    eager(torch.randn(2, 3, 8, 8)).sum().backward()
    assert (model.c1.weight.grad.flatten(1).abs().sum(1) == 0).any()
    # ... and is refused where AOTAutograd would bake the first window into the graph
    torch._dynamo.reset()
    refused = torch.compile(model, backend=sfx.backend([SLICEOUT], inner="aot_eager"))
    with pytest.raises(Exception, match="bake its first"):
        refused(torch.randn(2, 3, 8, 8))


def test_backend_refuses_passes_that_add_parameters():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    compiled = torch.compile(model, backend=sfx.backend(sfx.IsoFLOP(kind="doped"), inner="eager"))
    with pytest.raises(Exception, match=r"adds parameters.*sfx\.sparsify"):
        compiled(torch.randn(4, 8))


def test_compile_sparsified_module_with_inductor_iso_flop():
    """The other route: sparsify first (any pass, IsoFLOP included), then compile the result."""
    torch.manual_seed(0)
    # two hidden layers: Sparse Wide widens a layer only when its consumer is rewritten too
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 2))
    x = torch.randn(16, 8)
    fast = sfx.sparsify(model, [sfx.IsoFLOP(kind="wide", sparsity=0.5), sfx.DropIT(keep=0.5)],
                        example_inputs=(x,))
    compiled = torch.compile(fast, backend="inductor")
    fast.train()
    torch.manual_seed(3)
    out = compiled(x)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}
    fast.zero_grad()
    torch.manual_seed(3)
    ref = fast(x)
    ref.pow(2).mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    new = dict(sfx.new_parameters(model, fast))
    assert new and set(new) <= set(grads)  # IsoFLOP's own parameters are trained
    for name, g in grads.items():
        torch.testing.assert_close(g, fast.get_parameter(name).grad, rtol=1e-3, atol=1e-4)
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fast(x), rtol=1e-4, atol=1e-5)


class AttnNet(nn.Module):
    """Conv-BN-ReLU, then tokens through LayerNorm->Linear, GELU->Linear and attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 1)
        self.ln = nn.LayerNorm(32)
        self.qkv = nn.Linear(32, 96)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.c2(torch.relu(self.bn(self.conv(x))))
        t = x.flatten(2).transpose(1, 2)  # (batch, tokens, 32)
        q, k, v = self.qkv(self.ln(t)).view(t.shape[0], t.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
        t = t + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(t.shape)
        t = t + self.fc2(F.gelu(self.fc1(t)))
        return self.head(t.mean(1))


@pytest.mark.parametrize("recipe", [
    sfx.ActivationMemory(attention="bf16", dense="bf16"),
    [sfx.DropIT(keep=0.25), sfx.ActivationMemory(attention="int8")],
    sfx.ActivationMemory(gelu="recompute", layernorm="recompute"),
], ids=["bf16", "dropit+int8", "recompute"])
def test_compiled_step_holds_no_more_than_eager(recipe):
    """AOT autograd's default split hoists backward work that does not read the gradient into
    forward: a decompression there keeps the dense tensor the rewrite was made to drop."""
    from sparsify_fx.bench import saved_tensor_bytes

    torch.manual_seed(0)
    model = AttnNet().train()
    x = torch.randn(4, 3, 8, 8)
    fast = sfx.sparsify(model, recipe, example_inputs=(x,)).train()
    dense, eager = saved_tensor_bytes(model, (x,)), saved_tensor_bytes(fast, (x,))
    assert eager < 0.8 * dense
    compiled = torch.compile(fast, backend="aot_eager")
    compiled(x).sum().backward()
    assert saved_tensor_bytes(compiled, (x,)) <= eager
    # and the compiled step's gradients are the eager rewrite's, up to fp32 summation order: the
    # recomputed attention's backward sums in another order once compiled (torch 2.14: 7.6e-6 on
    # one element of a 1.3-scale qkv gradient with 2 threads, 3.1e-5 with 1), so atol scales
    # with each gradient's magnitude
    ref = _grads_after_step(fast, x)
    got = _grads_after_step(compiled, x)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5,
                                   atol=1e-6 + 4e-5 * float(ref[name].abs().max()), msg=name)


def _grads_after_step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = None
    torch.manual_seed(1)  # DropIT's selection is deterministic, but keep the stream alike
    model(x).pow(2).sum().backward()
    # (torch.compile's wrapper names them "_orig_mod.<name>")
    return {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in params.items() if p.grad is not None}


@pytest.fixture
def _no_tf32():
    """Exact fp32 convolutions and matmuls: cuDNN may pick another (TF32) algorithm inside a
    CUDA graph than eagerly, which moves a gradient by ~1e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("how", ["sparsified module", "backend inner"])
def test_cuda_graphs_replay_the_rewritten_step_like_eager(how, _no_tf32):
    """On a GPU the passes' ops are host-bound in eager; replayed as CUDA graphs (compiling
    sfx.sparsify's result with backend="cudagraphs", or the backend's inner="cudagraphs")
    they train alike."""
    torch.manual_seed(0)
    recipe = [sfx.DropIT(keep=0.25), sfx.ActivationMemory(attention="bf16", dense="bf16")]
    model = AttnNet().cuda().train()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    if how == "sparsified module":
        fast = sfx.sparsify(model, recipe, example_inputs=(x,)).train()
        ref = _grads_after_step(fast, x)
        compiled = torch.compile(fast, backend="cudagraphs")
    else:  # against the same backend run eagerly: Dynamo's graph is not sfx.sparsify's
        ref = _grads_after_step(torch.compile(model, backend=sfx.backend(recipe, inner="eager")), x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=sfx.backend(recipe, inner="cudagraphs"))
    for _ in range(3):  # warm-up, recording, replay
        grads = _grads_after_step(compiled, x)
    assert grads.keys() == ref.keys()
    torch.testing.assert_close(grads, ref, rtol=1e-4, atol=1e-5)


class BNNet(nn.Module):
    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=momentum)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        return self.head(torch.relu(self.bn2(self.c2(x))).mean((2, 3)))


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_backend_rewrites_dynamo_functional_batch_norm_like_the_module(inner):
    """Dynamo inlines BatchNorm as F.batch_norm (running statistics updated in place, the
    average factor computed): the backend compresses it like sfx.sparsify does the module,
    with the same gradients and running statistics, step after step."""
    import copy

    torch.manual_seed(0)
    a = BNNet().train()
    b = copy.deepcopy(a)
    ref = sfx.sparsify(a, "actmem", example_inputs=(torch.randn(4, 3, 8, 8),)).train()
    to_inner = sfx.backend("actmem", inner=inner)
    compiled = torch.compile(b, backend=to_inner)
    exact = inner == "eager"  # AOT traces the PyTorch path, not the CPU kernels: float order
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8)
        torch.testing.assert_close(_grads_after_step(compiled, x), _grads_after_step(ref, x),
                                   rtol=0 if exact else 1e-3, atol=0 if exact else 1e-5)
    torch.testing.assert_close(dict(b.named_buffers()), dict(a.named_buffers()), rtol=0, atol=0)
    ops = [(r.module, r.op) for results in to_inner.results for res in results for r in res.rewrites]
    assert ops.count(("bn", "batch_norm")) == ops.count(("bn2", "batch_norm")) == 1, ops


def test_backend_reports_the_functional_batch_norm_it_keeps():
    """Eval graphs hold F.batch_norm with training=False: nothing is saved for backward, so it
    stays, with a reason."""
    torch.manual_seed(0)
    model = BNNet().eval()
    to_inner = sfx.backend("actmem", inner="eager")
    torch.compile(model, backend=to_inner)(torch.randn(2, 3, 8, 8))
    skips = [s for results in to_inner.results for res in results for s in res.skips if s.op == "batch_norm"]
    assert skips and all("training not the constant True" in s.reason for s in skips), skips
