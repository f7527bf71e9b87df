#!/usr/bin/env bash
# Issue 12's compiled-vs-eager bar: bench/step_speed.py (eager vs regional compile + CUDA graph, with the
# fp32 reference) run twice in one command on one GPU, with inductor's default numerics and with
# TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1 (fused bf16 ops round their intermediates as eager does).
# Results: $OUT/MODEL/step_speed-default.{json,md} and step_speed-emulate.{json,md}, log $OUT/numerics-MODEL.log.
#   usage: bash bench/compile_numerics.sh MODEL SIZES   (e.g. flux-dev 256,512,1024; wan2.1-1.3b 832x480x81)
#   env: OUT (./gpu-out), STEPS 3, REPS 2, PART_TIMEOUT (280 s per run)
set -uo pipefail
model=${1:?model}; sizes=${2:?sizes}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT/$model"
log="$OUT/numerics-$model.log"
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
{ date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } >>"$log"
python3 -c 'import gfcoll._gfcoll' 2>/dev/null || python3 -m pip install -q --no-build-isolation --no-deps -e . >>"$log" 2>&1
for variant in default emulate; do
  flag=0; [ "$variant" = emulate ] && flag=1
  echo "== $model $variant (TORCHINDUCTOR_EMULATE_PRECISION_CASTS=$flag) $(date -u +%H:%M:%S)" | tee -a "$log"
  TORCHINDUCTOR_EMULATE_PRECISION_CASTS=$flag timeout "${PART_TIMEOUT:-280}" python3 bench/step_speed.py --model "$model" \
    --sizes "$sizes" --modes eager,regional+graph --steps "${STEPS:-3}" --reps "${REPS:-2}" --warmup 1 \
    --breakdown-steps 1 --fp32-reference --tag="-$variant" --out "$OUT/$model" >>"$log" 2>&1
  echo "$variant rc $?" | tee -a "$log"
  grep -E "ms/step|relative L2" "$log" | tail -8
done
