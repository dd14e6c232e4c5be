"""Smoke test of the real-task benchmark's core loop: a few steps, one seed, two recipes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import benchmarks.bench_real_task as bench


def test_lm_core_loop_results_structure_and_learning():
    torch.manual_seed(0)
    cfg = replace(bench.LMConfig(), layers=1, width=32, heads=2, context=16, batch=4, steps=20,
                  eval_every=10, byte_budget=50_000, val_windows=8)
    raw = bench.run(["lm"], ["actmem", "bsr:density=0.5,block_size=8"], [0], {"lm": cfg}, log=lambda *_: None)
    summary = bench.summarize(raw)
    rows = summary["lm"]
    assert set(rows) == {"dense", "actmem", "bsr:density=0.5,block_size=8"}
    for name, row in rows.items():
        assert not row["errors"], (name, row["errors"])
        assert row["seeds"] == [0]
        losses = [p[1] for p in row["val_curve_mean"]]
        assert [p[0] for p in row["val_curve_mean"]] == [10, 20]
        assert all(math.isfinite(v) for v in losses)
        # an untrained byte model starts near ln(256) = 5.55 nats/byte
        assert losses[-1] < losses[0] < math.log(256)
        assert row["time_ratio"]["mean"] > 0
    # actmem is exact: the same training as dense, to float tolerance
    assert rows["actmem"]["val_loss"]["mean"] == pytest.approx(rows["dense"]["val_loss"]["mean"], abs=1e-3)
    assert "| `bsr:density=0.5,block_size=8` (1 seed) |" in bench._markdown(summary)


def test_stdlib_text_is_deterministic():
    a = bench.stdlib_bytes(10_000)
    assert a.shape == (10_000,) and int(a.max()) < 256
    assert torch.equal(a, bench.stdlib_bytes(10_000))
