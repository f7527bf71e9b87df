#!/usr/bin/env bash
# On a one-GPU device machine, from the repository root (carry .whl): the checks of the fast step
# path and the elastic runtime that one GPU allows. Logs and results under $OUT (default ./gpu-out).
#   usage: bash tests/gpu/run_one_gpu.sh tests|speed|breakdown
#   tests      tests/gpu/test_step_graphs.py, test_batch_graphs.py and test_elastic_dit.py (ipc variants: 4 ranks on the GPU)
#              (ONE_GPU_K: a pytest -k expression; ONE_GPU_TIMEOUT: seconds, default 540; ONE_GPU_SEGV_TRACE=1:
#              native crash backtraces, resolved into $OUT/one-gpu-crashes-resolved.txt, see run_ipc.sh)
#   speed      bench/step_speed.py on flux-dev with the fp32 reference (eager vs compiled + graph)
#   breakdown  gfdit profile --breakdown with ONE_GPU_NPROC (4) ranks sharing the GPU over ipc (eager),
#              SP ONE_GPU_DEGREES (1,2,4); flux-dev takes about 34 GB per rank, so 2 ranks on an 80 GB card
set -uo pipefail
what=${1:?tests, speed or breakdown}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
log="$OUT/one-gpu-$what.log"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, diffusers; print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__)'
} >"$log" 2>&1
python3 -m pip install -q --no-build-isolation --no-deps -e . >>"$log" 2>&1 || { tail -30 "$log"; exit 1; }
case "$what" in
  tests)
    preload=()
    if [ "${ONE_GPU_SEGV_TRACE:-0}" = 1 ] && cc -O1 -g -fPIC -shared -o /tmp/segv_trace.so tests/gpu/diag/segv_trace.c 2>/dev/null; then
      preload=(env LD_PRELOAD=/tmp/segv_trace.so)
    fi
    "${preload[@]}" timeout "${ONE_GPU_TIMEOUT:-540}" python3 -m pytest -v -s -rs --tb=short -p no:cacheprovider \
      ${ONE_GPU_K:+-k "$ONE_GPU_K"} tests/gpu/test_step_graphs.py tests/gpu/test_batch_graphs.py tests/gpu/test_elastic_dit.py >>"$log" 2>&1
    echo "tests rc $?" | tee -a "$log"
    if grep -q "^\[segv_trace\]" "$log"; then
      python3 tests/gpu/diag/resolve_frames.py "$log" >"$OUT/one-gpu-crashes-resolved.txt" 2>&1
      grep -A30 "segv_trace\]" "$OUT/one-gpu-crashes-resolved.txt" | grep -v "^  /usr\|libc\|libpython" | head -40
    fi
    grep -E "PASSED|FAILED|SKIPPED|ERROR|elastic vs single|passed|failed" "$log" | tail -20 ;;
  speed)
    timeout "${ONE_GPU_TIMEOUT:-560}" python3 bench/step_speed.py --model flux-dev --sizes 256,512,1024 --modes eager,regional+graph \
      --steps 3 --reps 2 --warmup 1 --breakdown-steps 1 --fp32-reference --out "$OUT/flux" >>"$log" 2>&1
    echo "speed rc $?" | tee -a "$log"
    tail -25 "$log" ;;
  breakdown)
    GFCOLL_TRANSPORT=ipc timeout "${ONE_GPU_TIMEOUT:-560}" python3 -m gfdit.cli profile --nproc "${ONE_GPU_NPROC:-4}" --model flux-dev --sizes 512,1024 \
      --degrees "${ONE_GPU_DEGREES:-1,2,4}" --steps 3 --compile off --cuda-graphs off --out "$OUT/profile-ipc4.json" \
      --breakdown "$OUT/breakdown-ipc4" >>"$log" 2>&1
    echo "breakdown rc $?" | tee -a "$log"
    tail -40 "$OUT/breakdown-ipc4.md" 2>/dev/null || tail -30 "$log" ;;
  *) echo "unknown part $what" >&2; exit 2 ;;
esac
