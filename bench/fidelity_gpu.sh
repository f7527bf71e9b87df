#!/usr/bin/env bash
# Issue 14's one-GPU fidelity table: two policies x two loads on one GPU, one rank (no ranks
# time-slicing the GPU: the simulator has no GPU sharing curve). Profile the model on this GPU, make
# one trace per load (~120 requests), replay each against a server per policy and simulate it
# (gfdit eval fidelity --calibrate-overhead). Run from the repository root on the device machine:
#   bash bench/fidelity_gpu.sh OUT_DIR
#   env: MODEL (tiny-flux), SIZES (32,144,256), STEPS (20), LOADS ("0.5 0.8"), POLICIES ("fcfs-elastic;sjf"),
#        REQUESTS (120), REPEATS (2: measurements per policy, each on a fresh server: the measurement's own spread), SERVE_EXTRA (more gfdit serve options, e.g. "--compile off --cuda-graphs off")
set -uo pipefail
out=${1:?out dir}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import gfcoll._gfcoll' 2>/dev/null || python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1
model=${MODEL:-tiny-flux}; sizes=${SIZES:-32,144,256}; steps=${STEPS:-20}
device=${DEVICE:-cuda}
prof=$out/profile.json
{ date -u +%FT%TZ; nvidia-smi -L 2>/dev/null; } >"$out/machine.log"
python3 -m gfdit.cli profile --model "$model" --device "$device" --sizes "$sizes" --steps 5 --reps 5 \
  ${SERVE_EXTRA:-} --out "$prof" >"$out/profile.log" 2>&1 || { echo "profile failed"; tail -20 "$out/profile.log"; exit 1; }
IFS=, read -r s m l <<<"$sizes"
classes=(--class "S:size=${s}x${s},steps=$steps,weight=1" --class "M:size=${m}x${m},steps=$steps,weight=1"
         --class "L:size=${l}x${l},steps=$steps,weight=1")
for load in ${LOADS:-0.5 0.8}; do
  trace=$out/trace-load$load.jsonl
  python3 -m gfdit.cli bench gen --model "$model" "${classes[@]}" --alpha 3 --cost-profile "$prof" \
    --target-load "$load" --world-size 1 --duration 1 --seed 0 --out "$trace" >/dev/null || exit 1
  rate=$(python3 -c "import json; print(json.loads(open('$trace').readline())['meta']['spec']['mean_rate'])")
  duration=$(python3 -c "print(round(${REQUESTS:-120} / $rate, 3))")
  python3 -m gfdit.cli bench gen --model "$model" "${classes[@]}" --alpha 3 --cost-profile "$prof" \
    --target-load "$load" --world-size 1 --duration "$duration" --seed 0 --out "$trace" || exit 1
  python3 -m gfdit.cli eval fidelity --trace "$trace" --policies "${POLICIES:-fcfs-elastic;sjf}" --chunk-steps 5 \
    --serve-args "--nproc 1 --model $model --device $device --cost-profile $prof --chunk-steps 5 --max-queue 1000 ${SERVE_EXTRA:-}" \
    --cost-profile "$prof" --calibrate-overhead --repeats "${REPEATS:-2}" --out "$out/load$load" || echo "fidelity at $load failed"
done
for f in "$out"/load*/fidelity.md; do echo "== $f"; cat "$f"; done
