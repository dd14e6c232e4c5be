"""Real-task accuracy: dense vs every recipe on a byte-level LM and an image task, 3 seeds.

    python -m benchmarks.bench_real_task [--task lm image] [--seeds 0 1 2] [--steps N]
                                         [--recipes R ...] [--out docs/results/bench_real_task.json]

* ``lm``: a byte-level GPT (pre-LayerNorm, 2 layers x width 64, 4 heads, MLP 4x, context 64,
  batch 16, AdamW lr 3e-3 with warmup and cosine decay, 150 steps) trained on the Python standard
  library's own top-level ``.py`` sources: files sorted by name under
  ``sysconfig.get_paths()["stdlib"]``, concatenated, the first 2 MiB kept, the first 90 % for
  training and the last 10 % for validation (nothing downloaded; the text depends on the
  Python version, which the results file records). Validation loss is in nats per byte,
  on 64 fixed windows.
* ``image``: scikit-learn's 8x8 digits upsampled to 16x16 (bilinear), fixed stratified split,
  a small CNN (3x3 and 1x1 convs of 16..64 channels with BatchNorm, a 2-layer Linear head; the
  1x1 convs and the head give the Linear-only techniques something to rewrite), AdamW, 100
  steps of batch 64.

Each recipe is applied the way a new user would: ``sfx.sparsify(model, recipe,
example_inputs=...)`` on the freshly initialised model, the optimizer built on the rewritten
module's parameters, the same data order as dense per seed. Runs are interleaved (for each
seed: dense, then every recipe) in one process, so the train-time ratio vs dense compares
neighbours; the host's cores are shared, so the ratios are noisy. The results file gets mean
+- std (population) of the final validation loss (and accuracy for ``image``) per recipe,
per-seed values, validation curves and times; rows of recipes not run this time are kept
from an existing results file (``--fresh`` drops them). A loss-curve plot goes to
``docs/img/bench_real_task.png`` when matplotlib is installed (skipped with a message when not).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx

__all__ = [
    "DEFAULT_RECIPES",
    "LMConfig",
    "ImageConfig",
    "stdlib_bytes",
    "TinyGPT",
    "train_lm",
    "train_image",
    "run",
    "summarize",
    "main",
]

DEFAULT_RECIPES = [
    "dropit:keep=0.1+actmem",
    "actmem",
    "budget:fraction=0.25,exact_only=True",
    "budget:fraction=0.25",
    "sliceout:p=0.25",
    "sliceout:p=0.5",
    "bsr:density=0.25",
    "bsr:density=0.5",
    "bsr:density=0.75",
    *(f"isoflop:kind={k},sparsity={s}" for s in (0.5, 0.75)
      for k in ("wide", "parallel", "factorized", "doped")),
]


@dataclass(frozen=True)
class LMConfig:
    """Sizes of the byte-level LM run (defaults sized for ~25 min of the full table on 2 cores)."""

    layers: int = 2
    width: int = 64
    heads: int = 4
    context: int = 64
    batch: int = 16
    steps: int = 150
    lr: float = 3e-3
    weight_decay: float = 0.1
    byte_budget: int = 2 * 1024 * 1024
    val_fraction: float = 0.1
    val_windows: int = 64
    eval_every: int = 25


@dataclass(frozen=True)
class ImageConfig:
    """Sizes of the image run."""

    size: int = 16
    batch: int = 64
    steps: int = 100
    lr: float = 3e-3
    weight_decay: float = 0.01
    eval_every: int = 25


# ---------------------------------------------------------------- LM data and model

_TEXT_CACHE: dict[int, torch.Tensor] = {}


def stdlib_bytes(budget: int) -> torch.Tensor:
    """The first ``budget`` bytes of the stdlib's top-level ``.py`` files, sorted by name."""
    if budget not in _TEXT_CACHE:
        root = Path(sysconfig.get_paths()["stdlib"])
        chunks, total = [], 0
        for path in sorted(root.glob("*.py")):
            data = path.read_bytes()
            chunks.append(data)
            total += len(data)
            if total >= budget:
                break
        text = b"".join(chunks)[:budget]
        _TEXT_CACHE[budget] = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    return _TEXT_CACHE[budget]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, context: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        mask = torch.full((context, context), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // h)) + self.mask[:t, :t]
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A byte-level pre-LayerNorm GPT with explicit (traceable) causal attention."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.tok = nn.Embedding(256, cfg.width)
        self.pos = nn.Parameter(torch.randn(cfg.context, cfg.width) * 0.02)
        self.blocks = nn.Sequential(*(_Block(cfg.width, cfg.heads, cfg.context) for _ in range(cfg.layers)))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def _cosine(step: int, steps: int) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _batched_logits(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Eval-mode logits in chunks of exactly the training batch (an exported capture is
    shape-specialised): the last chunk is padded by repetition and the padding dropped."""
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = torch.cat([chunk, chunk[:1].expand(batch - n, *chunk.shape[1:])])
        outs.append(model(chunk)[:n])
    return torch.cat(outs)


def _sparsified(model: nn.Module, recipe: str | None, example: tuple) -> nn.Module:
    return model if recipe is None else sfx.sparsify(model, recipe, example_inputs=example)


def train_lm(recipe: str | None, seed: int, cfg: LMConfig = LMConfig()) -> dict:
    """Train the byte GPT with ``recipe`` (None: dense); validation curve and final loss."""
    data = stdlib_bytes(cfg.byte_budget)
    split = int(len(data) * (1 - cfg.val_fraction))
    train, val = data[:split], data[split:]
    starts = torch.linspace(0, len(val) - cfg.context - 2, cfg.val_windows).long()
    val_x = torch.stack([val[s:s + cfg.context] for s in starts])
    val_y = torch.stack([val[s + 1:s + cfg.context + 1] for s in starts])

    torch.manual_seed(seed)
    model = _sparsified(TinyGPT(cfg), recipe, (val_x[: cfg.batch],))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.steps))
    gen = torch.Generator().manual_seed(seed)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            logits = _batched_logits(model, val_x, cfg.batch)
            loss = F.cross_entropy(logits.reshape(-1, 256), val_y.reshape(-1)).item()
        model.train()
        return loss

    curve, train_losses, elapsed = [], [], 0.0
    model.train()
    for step in range(cfg.steps):
        ix = torch.randint(0, len(train) - cfg.context - 1, (cfg.batch,), generator=gen)
        x = torch.stack([train[i:i + cfg.context] for i in ix])
        y = torch.stack([train[i + 1:i + cfg.context + 1] for i in ix])
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        loss.backward()
        opt.step()
        sched.step()
        elapsed += time.perf_counter() - t0
        train_losses.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, evaluate()))
    return {"val_loss": curve[-1][1], "val_curve": curve, "train_losses": train_losses,
            "train_time_s": elapsed}


# ---------------------------------------------------------------- image task


def _digits(size: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    # one fixed split for every seed: seeds vary the initialisation and the data order
    x_tr, x_te, y_tr, y_te = train_test_split(x.numpy(), y.numpy(), test_size=0.25, random_state=0,
                                              stratify=y.numpy())
    return torch.tensor(x_tr), torch.tensor(x_te), torch.tensor(y_tr), torch.tensor(y_te)


def _cnn() -> nn.Module:
    def cbr(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *cbr(1, 16, 3), *cbr(16, 32, 1), *cbr(32, 32, 3, 2), *cbr(32, 64, 1), *cbr(64, 64, 3, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train_image(recipe: str | None, seed: int, cfg: ImageConfig = ImageConfig()) -> dict:
    """Train the CNN with ``recipe`` (None: dense); test loss/accuracy curve and final values."""
    x_tr, x_te, y_tr, y_te = _digits(cfg.size)
    torch.manual_seed(seed)
    model = _sparsified(_cnn(), recipe, (x_tr[: cfg.batch],))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.steps))
    gen = torch.Generator().manual_seed(seed)

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = _batched_logits(model, x_te, cfg.batch)
        model.train()
        return F.cross_entropy(logits, y_te).item(), (logits.argmax(-1) == y_te).float().mean().item()

    curve, train_losses, elapsed = [], [], 0.0
    order = torch.randperm(len(x_tr), generator=gen)
    pos = 0
    model.train()
    for step in range(cfg.steps):
        if pos + cfg.batch > len(order):
            order, pos = torch.randperm(len(x_tr), generator=gen), 0
        idx = order[pos:pos + cfg.batch]
        pos += cfg.batch
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        loss.backward()
        opt.step()
        sched.step()
        elapsed += time.perf_counter() - t0
        train_losses.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, *evaluate()))
    return {"val_loss": curve[-1][1], "val_accuracy": curve[-1][2], "val_curve": curve,
            "train_losses": train_losses, "train_time_s": elapsed}


# ---------------------------------------------------------------- driver

_TRAINERS = {"lm": train_lm, "image": train_image}


def run(tasks: list[str], recipes: list[str], seeds: list[int], configs: dict, log=print) -> dict:
    """Per task, per seed: dense then each recipe (interleaved); raw per-run results.

    A recipe that fails to apply or train is recorded with its error, not fatal to the table.
    """
    raw: dict = {task: {} for task in tasks}
    for task in tasks:
        trainer, cfg = _TRAINERS[task], configs[task]
        for seed in seeds:
            for recipe in [None, *recipes]:
                name = recipe or "dense"
                try:
                    result = trainer(recipe, seed, cfg)
                except Exception as e:  # recorded, the table goes on
                    result = {"error": f"{type(e).__name__}: {e}"}
                raw[task].setdefault(name, {})[seed] = result
                shown = result.get("val_loss", result.get("error"))
                dense_t = raw[task]["dense"][seed].get("train_time_s")
                ratio = result.get("train_time_s", float("nan")) / dense_t if dense_t else float("nan")
                log(f"[{task}] seed {seed} {name}: val loss {shown} (time x dense {ratio:.2f})")
    return raw


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "values": values}


def summarize(raw: dict) -> dict:
    """Mean +- std per task and recipe, deltas and time ratios against dense (same seed)."""
    out: dict = {}
    for task, by_recipe in raw.items():
        dense = by_recipe["dense"]
        rows = {}
        for name, by_seed in by_recipe.items():
            ok = {s: r for s, r in by_seed.items() if "error" in r or "val_loss" in r}
            errors = {s: r["error"] for s, r in ok.items() if "error" in r}
            good = {s: r for s, r in ok.items() if "error" not in r}
            row: dict = {"seeds": sorted(good), "errors": errors}
            if good:
                row["val_loss"] = _stats([good[s]["val_loss"] for s in sorted(good)])
                row["delta_val_loss"] = row["val_loss"]["mean"] - statistics.mean(
                    dense[s]["val_loss"] for s in sorted(good) if s in dense)
                if "val_accuracy" in next(iter(good.values())):
                    row["val_accuracy"] = _stats([good[s]["val_accuracy"] for s in sorted(good)])
                ratios = [good[s]["train_time_s"] / dense[s]["train_time_s"] for s in sorted(good) if s in dense]
                row["time_ratio"] = _stats(ratios)
                row["val_curve_mean"] = [
                    [pts[0][0], *[statistics.mean(p[i] for p in pts) for i in range(1, len(pts[0]))]]
                    for pts in zip(*(good[s]["val_curve"] for s in sorted(good)))
                ]
                row["runs"] = {str(s): {k: v for k, v in good[s].items() if k != "train_losses"}
                               for s in sorted(good)}
            rows[name] = row
        out[task] = rows
    return out


def _markdown(summary: dict) -> str:
    lines = []
    for task, rows in summary.items():
        unit = "nats/byte" if task == "lm" else "loss"
        acc = task == "image"
        head = f"| recipe | val {unit} (mean ± std) | Δ vs dense |" + (" accuracy % | " if acc else "") + " time × dense |"
        lines += [f"\n**{task}**\n", head, "|---|---:|---:|" + ("---:|" if acc else "") + "---:|"]
        for name, row in rows.items():
            if "val_loss" not in row:
                lines.append(f"| `{name}` | error: {next(iter(row['errors'].values()))} |")
                continue
            v, r = row["val_loss"], row["time_ratio"]
            seeds = "" if len(row["seeds"]) >= 3 else f" ({len(row['seeds'])} seed{'s' * (len(row['seeds']) > 1)})"
            cells = [f"`{name}`{seeds}", f"{v['mean']:.4f} ± {v['std']:.4f}", f"{row['delta_val_loss']:+.4f}"]
            if acc:
                a = row.get("val_accuracy")
                cells.append(f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f}" if a else "n/a")
            cells.append(f"{r['mean']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(summary: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss-curve plot (pip install matplotlib)")
        return
    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, row in summary[task].items():
            if "val_curve_mean" not in row:
                continue
            xs = [p[0] for p in row["val_curve_mean"]]
            ys = [p[1] for p in row["val_curve_mean"]]
            style = {"color": "black", "linewidth": 2.5} if name == "dense" else {"linewidth": 1}
            ls = "--" if name.startswith("isoflop") else ("-." if name.startswith(("bsr", "sliceout")) else "-")
            ax.plot(xs, ys, ls, label=name, **style)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss" + (" (nats/byte)" if task == "lm" else ""))
        ax.set_title(f"{task}: mean over seeds")
        lo = min(min(p[1] for p in r["val_curve_mean"]) for r in summary[task].values() if "val_curve_mean" in r)
        # zoomed on the end of training, where the recipes differ (early points run off the top)
        ax.set_ylim(lo * 0.98, lo * 1.12 if task == "lm" else lo * 2.5 + 0.05)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", default=["lm", "image"], choices=sorted(_TRAINERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override both tasks' step counts")
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--out", default="docs/results/bench_real_task.json")
    parser.add_argument("--plot", default="docs/img/bench_real_task.png")
    parser.add_argument("--fresh", action="store_true", help="drop rows kept from an existing results file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: print the table and draw the plot of the results file")
    args = parser.parse_args(argv)
    if args.table_only:
        tasks = json.loads(Path(args.out).read_text())["tasks"]
        print(_markdown({t: v["rows"] for t, v in tasks.items()}))
        _plot({t: v["rows"] for t, v in tasks.items()}, Path(args.plot))
        return
    torch.set_num_threads(args.threads)
    configs = {"lm": LMConfig(), "image": ImageConfig()}
    if args.steps is not None:
        configs = {k: replace(c, steps=args.steps) for k, c in configs.items()}
    recipes = [r for r in args.recipes if r != "dense"]
    started = time.time()
    summary = summarize(run(args.task, recipes, args.seeds, configs))

    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() and not args.fresh else {}
    tasks = previous.get("tasks", {})
    tasks_kept = bool(tasks)
    for task, rows in summary.items():
        kept = tasks.get(task, {}).get("rows", {}) if previous.get("configs", {}).get(task) == asdict(configs[task]) else {}
        # rows from this run replace same-named rows; dense is always re-run with them
        tasks[task] = {"rows": {**kept, **rows}}
    import torch as _torch  # the version string as the run saw it

    doc = {
        # every invocation whose rows the file holds (rows of recipes not re-run are kept)
        "commands": [*(previous.get("commands", [previous.get("command")] if previous else []) if tasks_kept else []),
                     "python -m benchmarks.bench_real_task " + " ".join(argv if argv is not None else sys.argv[1:])],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "torch": _torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "seeds": args.seeds,
        "configs": {**previous.get("configs", {}), **{t: asdict(configs[t]) for t in args.task}},
        "wall_s": time.time() - started,
        "tasks": tasks,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(_markdown({t: v["rows"] for t, v in tasks.items()}))
    print(f"results written to {out}")
    _plot({t: v["rows"] for t, v in tasks.items()}, Path(args.plot))


if __name__ == "__main__":
    main()
