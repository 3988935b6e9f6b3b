#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# GPU check in one run (< 5 min): build the CUDA extension, run the GPU tests (the CUDA kernel cases
# and tests/test_gpu.py: host syncs per meta step, NaN on the GPU, GPU vs CPU hypergradients), and measure
# kernel bandwidth against a device-to-device copy of the same bytes in the same process.
# Usage: bash bench/gpu_check.sh   (from the repository root, on a machine with a GPU and nvcc)
#        GIMLI_GPU_PEERS=1 bash bench/gpu_check.sh   also runs bench/gpu_peers.py; its table goes to $OUT/gpu_peers.md when $OUT is
#        set. higher and TorchOpt are reported as errors unless importable there: on a machine
#        without internet, carry their wheels (see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
echo "== build (the sources in csrc/, CUDA included when torch has CUDA and nvcc is found)"
python -m gimli_bptt build-kernels   # announces the compile, then reports what is loaded and for which devices
python - <<'PY'
import torch
from gimli_bptt import kernels
assert torch.cuda.is_available(), "no GPU visible to torch"
assert kernels.is_available("cuda"), kernels.info()
PY
echo "== GPU tests"
tests_rc=0
timeout 180 python -m pytest -q tests/test_kernels.py tests/test_gpu.py -k cuda || tests_rc=$?  # measure anyway
echo "== bandwidth (adam_step / adam_step_vjp vs a device-to-device copy)"
python - <<'PY'
import torch
from gimli_bptt import kernels
kernels.is_available("cuda")
def bench(fn, reps=50):
    for _ in range(3): fn()
    torch.cuda.synchronize(); s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps): fn()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / reps / 1e3
for dtype in (torch.float32, torch.float64):
    for n in (10**6, 10**7, 10**8 // (2 if dtype == torch.float64 else 1)):
        x = [torch.randn(n, device="cuda", dtype=dtype) for _ in range(5)]; x[3] = x[3].abs()
        off = torch.tensor([0, n], device="cuda")
        hyper = [torch.tensor([v], dtype=torch.float64, device="cuda") for v in (1e-3, 0.9, 0.999, 1e-8, 0.0)]
        es = x[0].element_size()
        step = lambda: torch.ops.gimli.adam_step(x[0], x[1], x[2], x[3], None, off, hyper, 0, 3.0, False, False, False, False)
        vjp = lambda: torch.ops.gimli.adam_step_vjp(x[0], x[1], x[2], x[3], None, x[4], None, None, None, off, hyper, 0, 1, 3.0, False, False, False, False)
        src = torch.empty(n * 7, device="cuda", dtype=dtype); dst = torch.empty_like(src)
        copy = lambda: dst.copy_(src)
        t_copy, t_step, t_vjp = bench(copy), bench(step), bench(vjp)
        gb = lambda nbytes, t: nbytes / t / 1e9
        print(f"{str(dtype):14s} n={n:>11,d}  copy {gb(2 * 7 * n * es, t_copy):7.1f} GB/s  "
              f"adam_step {gb(7 * n * es, t_step):7.1f} GB/s ({gb(7 * n * es, t_step) / gb(2 * 7 * n * es, t_copy):.2f} of copy)  "
              f"adam_step_vjp(lr learned) {gb((5 + 4 + 1) * n * es, t_vjp):7.1f} GB/s", flush=True)
PY
if [ "${GIMLI_GPU_PEERS:-0}" = "1" ]; then
  echo "== side by side on the GPU (bench/gpu_peers.py)"
  timeout 300 python bench/gpu_peers.py --repeats 5 ${OUT:+--out "$OUT/gpu_peers.md"} || echo "gpu_peers.py failed or timed out"
fi
echo "== done in $(( $(date +%s) - start )) s (GPU tests: $([ $tests_rc = 0 ] && echo passed || echo "FAILED, rc $tests_rc"))"
exit $tests_rc
