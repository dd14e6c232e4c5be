"""The memory budget's calibration kept on disk, so a machine prices a plan the same way every
run and a planning run does not spend the calibration's seconds again.

The calibration (``budget_costs.calibrate``) takes about 9 s on a 2-core CPU, most of
ViT-B/16's planning time, and it varies between processes on a noisy host: the same model
and budget got different plans from one run to the next (ResNet-50 at checkpointing's memory:
11 recomputed blocks in one run, 13 in another). A cached calibration is reused only where
everything that moves the prices is the same: the device (a CPU's model and feature flags, a
GPU's name and compute capability), the dtype, torch's version, the number of threads,
whether the C++ kernels are in use, and the source of the passes whose ops are timed (an edit
to any of them measures again). ``MemoryBudget(calibration="fresh")`` measures again and
replaces the cached one. The rates carry a host reference timed with them (a bf16 round trip,
``budget_costs._reference_seconds``); a cached calibration whose reference is more than 1.5x
off today's is measured again (one cached while other processes shared the cores priced
every compressed form 10-30x high against the recompute prices timed at planning).

Where: ``$SPARSIFY_FX_CACHE_DIR``, else ``$XDG_CACHE_HOME/sparsify_fx``, else
``~/.cache/sparsify_fx``; one small JSON file per key. A directory that cannot be read or
written leaves the calibration in memory only, as before; a file that does not parse or
does not match its key is measured again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["cache_dir", "calibration_key", "load", "store", "CACHE_DIR_ENV"]

#: the environment variable that names the cache directory
CACHE_DIR_ENV = "SPARSIFY_FX_CACHE_DIR"


def cache_dir() -> Path | None:
    """Where cached calibrations live (see the module docstring); ``None`` without a home
    directory to put them in."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "sparsify_fx"
    try:
        return Path.home() / ".cache" / "sparsify_fx"
    except (RuntimeError, KeyError):  # no $HOME and no password entry (some containers)
        return None


@functools.cache
def _code_hash() -> str:
    """A hash of the passes' sources: the ops the calibration times live there."""
    digest = hashlib.sha1()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(index)} sm{''.join(map(str, torch.cuda.get_device_capability(index)))}"
    from sparsify_fx.passes.kernels.cpu import _cpu_tag, load

    return f"cpu {_cpu_tag()} kernels={'on' if load() is not None else 'off'}"


def calibration_key(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Everything a cached calibration must match to be reused."""
    return {"device": _device_name(device), "dtype": str(dtype), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "code": _code_hash()}


def _path(key: dict[str, Any]) -> Path | None:
    directory = cache_dir()
    if directory is None:
        return None
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return directory / f"calibration-{name}.json"


def load(key: dict[str, Any]) -> tuple[dict[str, float], Path] | None:
    """The rates cached under ``key`` and their file, or ``None`` (none, unreadable, another
    key, no rates, a negative or non-numeric rate)."""
    path = _path(key)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    rates = data.get("rates")
    if data.get("key") != key or not isinstance(rates, dict) or not rates:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in rates.values()):
        return None
    return {k: float(v) for k, v in rates.items()}, path


def store(key: dict[str, Any], rates: dict[str, float], seconds: float) -> Path | None:
    """Write ``rates`` under ``key`` (atomically: a concurrent reader sees the old file or the
    new one); the file, or ``None`` where the directory cannot be written."""
    path = _path(key)
    if path is None:
        return None
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "rates": rates, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "calibration_seconds": round(seconds, 3)}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return None
    return path
