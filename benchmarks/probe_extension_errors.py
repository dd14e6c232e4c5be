"""Whether a C++ exception thrown in a ``load_inline`` extension reaches Python on this machine.

On the lent H100's image (torch 2.11 built by gcc-toolset-13, extensions built by the system's
g++ 13.3) every variant below died with SIGSEGV at its first ``TORCH_CHECK`` that failed, while
the same calls that succeed returned normally; on the CPU hosts (torch 2.11 and 2.15, g++ 12.2)
every variant raised ``RuntimeError``. The kernels (``passes/kernels/cpu.py``) throw only on
inconsistent arguments, which the library never passes; their refusal tests skip where this
probe fails (``tests/test_dropit.py``).

    python -m benchmarks.probe_extension_errors
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import torch

__all__ = ["VARIANTS", "main"]

#: compiler flags; ``L:`` marks a linker flag
VARIANTS = {
    "plain": "-O3", "openmp": "-O3 -fopenmp L:-fopenmp", "native": "-O3 -march=native",
    "static_libstdcxx": "-O3 L:-static-libstdc++", "static_libgcc": "-O3 L:-static-libgcc",
}

_CHILD = textwrap.dedent('''
    import sys
    from torch.utils.cpp_extension import load_inline
    flags = sys.argv[2].split()
    src = "#include <torch/extension.h>\\nint64_t boom(int64_t n) { TORCH_CHECK(n < 3, \\"too big: \\", n); return n; }\\n"
    m = load_inline(name="sfx_probe_" + sys.argv[1], cpp_sources=[src], functions=["boom"],
                    extra_cflags=[f for f in flags if not f.startswith("L:")],
                    extra_ldflags=[f[2:] for f in flags if f.startswith("L:")])
    print("returned", m.boom(1), flush=True)
    try:
        m.boom(5)
    except RuntimeError as e:
        print("raised", str(e).splitlines()[0], flush=True)
''')


def main() -> int:
    compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    print("torch", torch.__version__, re.findall(r"CXX_COMPILER=[^,]*", torch.__config__.show()), "system", compiler)
    procs = {name: subprocess.Popen([sys.executable, "-c", _CHILD, name, flags], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True) for name, flags in VARIANTS.items()}
    failed = 0
    for name, p in procs.items():
        out, _ = p.communicate(timeout=600)
        ok = p.returncode == 0 and "raised" in out
        failed += not ok
        print(f"{name:18s} rc {p.returncode:4d}  {'raises cleanly' if ok else 'BROKEN'}  {' | '.join(out.split(chr(10)))[:80]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
