#!/usr/bin/env bash
# On the device machine, from the repository root: build, run tests/gpu on 2 and 4 GPUs, run the
# benchmarks. Logs and results go under $OUT (default ./gpu-out); a short summary is printed last.
#   usage: bash tests/gpu/run_all.sh [tests|bench|all|collectives]   (default all: tests, then the
#   DiT step and migration bench, a flux-dev cost profile (gfdit profile), 4-GPU formation and broadcast; collectives: the full gfcoll-bench sweeps)
set -uo pipefail
what=${1:-all}
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
log="$OUT/log.txt"
use_wheels
{ nvidia-smi -L; nvidia-smi topo -m; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'; } >>"$log" 2>&1
step build python3 -m pip install --no-build-isolation --no-deps -e .
step build_info python3 -c 'import gfcoll, json; print(json.dumps(gfcoll.build_info()))'
ngpu=$(nvidia-smi -L | wc -l)
if [ "$what" = all ] || [ "$what" = tests ]; then
  step gpu_tests timeout 420 python3 -m pytest -v -rs -s tests/gpu
  step demo_cuda torchrun --nproc-per-node "$ngpu" -m gfcoll.demo --device cuda
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  if [ "$ngpu" -ge 4 ]; then
    step dit_steps timeout 300 torchrun --nproc-per-node 4 bench/dit_steps.py --model flux-dev \
      --sizes 512,1024,2048 --degrees 1,2,4 --json "$OUT/dit_steps.json"
    step profile_flux timeout 300 python3 -m gfdit.cli profile --nproc 4 --model flux-dev \
      --sizes 512,1024,2048 --out "$OUT/flux-dev-profile.json"
    mkdir -p "$OUT/formation4" "$OUT/bcast4"
    step formation_4 timeout 150 torchrun --nproc-per-node 4 -m gfcoll.bench --ops all_reduce -b 1K -e 1K \
      --formation-reps 5 --json "$OUT/formation4/results.json"
    step broadcast_4 timeout 120 torchrun --nproc-per-node 4 -m gfcoll.bench --ops broadcast -b 1M -e 256M -f 4 \
      --no-formation --check --json "$OUT/bcast4/results.json"
    (cd "$OUT" && tar czf bench.tar.gz formation4 bcast4 && rm -rf formation4 bcast4) >>"$log" 2>&1
  fi
fi
if [ "$what" = collectives ]; then
  for n in 2 4; do
    [ "$ngpu" -ge "$n" ] || continue
    d="$OUT/bench$n"; mkdir -p "$d"
    step "bench_$n" timeout 300 env CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) torchrun --nproc-per-node "$n" \
      -m gfcoll.bench -b 1K -e 256M -f 4 --iters 20 --warmup 5 --check --json "$d/results.json" --plot "$d"
  done
fi
echo "=== summary" | tee -a "$log"
printf '%s\n' "${summary[@]}" | tee -a "$log"
grep -E "passed|failed|error" "$log" | tail -5
