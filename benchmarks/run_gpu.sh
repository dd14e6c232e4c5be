#!/usr/bin/env bash
# The GPU checks and benchmarks of one lent-GPU session, by stage (a machine starts bare: the
# package is installed first). Logs and results go to $OUT (or results/gpu/).
#   benchmarks/run_gpu.sh tests      # the CUDA-only tests (they skip in CI)
#   benchmarks/run_gpu.sh probe      # whether a C++ extension's exception reaches Python there
#   benchmarks/run_gpu.sh suite      # the whole test suite on that machine's torch, in parallel
#                                    # (pytest-xdist), the CUDA-only tests included
#   benchmarks/run_gpu.sh kernel     # BSR weight-gradient kernel: Triton vs torch vs dense
#   benchmarks/run_gpu.sh memory     # bench_memory on CUDA, fp32 and bf16 autocast
#   benchmarks/run_gpu.sh profile    # where ResNet-50's DropIT step spends its GPU time
#   benchmarks/run_gpu.sh bsr        # bench_block_sparse (ResMLP-12) on CUDA
#   benchmarks/run_gpu.sh budget     # bench_budget: MemoryBudget vs checkpointing on CUDA
#   benchmarks/run_gpu.sh graphs     # bench_memory with every variant's step under CUDA graphs,
#                                    # and the compiled step's own memory (aot_eager)
set -uo pipefail
out=${OUT:-results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || echo "editable install failed; PYTHONPATH only"
python3 - <<'PY'
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name())
PY
for stage in "$@"; do
  case $stage in
    tests)  python3 -m pytest -q -rs tests/test_bsr_triton.py tests/test_autocast.py tests/test_errors.py \
              tests/test_activation_memory.py::test_unpack_on_cuda_matches_cpu \
              tests/test_compile.py::test_cuda_graphs_replay_the_rewritten_step_like_eager \
              2>&1 | tee "$out/tests.log" | tail -25 ;;
    probe)  python3 -m benchmarks.probe_extension_errors 2>&1 | tee "$out/probe.log" ;;
    suite)  OMP_NUM_THREADS=1 python3 -m pytest -q -rfEs -p no:cacheprovider -n "${SUITE_WORKERS:-14}" tests \
              2>&1 | tee "$out/suite.log" | tail -60 ;;
    kernel) python3 -m benchmarks.bench_bsr_kernel --out "$out/bench_bsr_kernel.json" 2>&1 | tee "$out/kernel.log" | tail -40 ;;
    memory) for amp in ${MEM_AMPS:-off bf16}; do
              python3 -m benchmarks.bench_memory --device cuda --amp $amp --repeats 10 --batch "${MEM_BATCH:-32}" \
                --models ${MEM_MODELS:-resnet50 vit_b_16 resnet18 convnext_tiny mlp} \
                --out "$out/bench_memory_cuda_$amp.json" 2>&1 | tee "$out/memory_$amp.log" | tail -30
            done ;;
    profile) python3 -m benchmarks.profile_step --device cuda --batch 32 --model resnet50 \
              --recipe "dropit:keep=0.1" "dropit:keep=0.1+actmem" 2>&1 | tee "$out/profile_resnet50.log" | grep -v "^USDT" | tail -90 ;;
    bsr)    python3 -m benchmarks.bench_block_sparse --config resmlp12 --device cuda --batch 64 --reps 10 \
              --out "$out/bench_block_sparse_cuda.json" 2>&1 | tee "$out/bsr.log" | tail -20 ;;
    budget) python3 -m benchmarks.bench_budget --device cuda --batch "${BUDGET_BATCH:-32}" --repeats 10 \
              --fractions ${BUDGET_FRACTIONS:-0.5 0.25} --models ${BUDGET_MODELS:-vit_b_16 resnet50 gpt2} \
              --out "$out/bench_budget_cuda.json" 2>&1 | tee "$out/budget.log" | tail -40 ;;
    graphs) for mode in aot_eager cudagraphs; do
              python3 -m benchmarks.bench_memory --device cuda --batch "${MEM_BATCH:-32}" --repeats 10 \
                --models ${MEM_MODELS:-resnet50 vit_b_16 convnext_tiny} --compile $mode \
                --configs actmem+bf16 dropit+actmem dropit+actmem+attn budget:0.4 \
                --out "$out/bench_memory_cuda_$mode.json" 2>&1 | tee "$out/graphs_$mode.log" | grep "^|"
            done ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
