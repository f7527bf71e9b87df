#!/usr/bin/env bash
# Issue 16's one-GPU throughput comparison: the same trace of flux-dev 512² and 1024² requests served
# with batching off and on (bench/serving_gpu.sh, one server after the other), eager unless
# SERVE_ARGS says otherwise. Afterwards, anywhere: gfdit bench report DIR/unbatched DIR/batched --out R
#   usage: bash bench/batching_gpu.sh            (env: OUT, DURATION 40, LOAD 1.6, MIX "S:3,L:1",
#          STEPS 8, MAX_BATCH 4, POLICY fcfs-elastic, SERVE_ARGS "--compile off --cuda-graphs off",
#          ALONE_SAMPLE 12 (images compared with the same request served alone);
#          a CPU smoke run: MODEL tiny-flux DEVICE cpu S_SIZE 64 L_SIZE 128)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
steps=${STEPS:-8}
IFS=, read -r s_weight l_weight <<<"$(echo "${MIX:-S:3,L:1}" | sed 's/[SL]://g')"
export MODEL=${MODEL:-flux-dev}
python3 -m gfdit.cli bench gen --model "$MODEL" --duration "${DURATION:-40}" --target-load "${LOAD:-1.6}" \
  --world-size 1 --class "S:size=${S_SIZE:-512}x${S_SIZE:-512},steps=$steps,weight=$s_weight" \
  --class "L:size=${L_SIZE:-1024}x${L_SIZE:-1024},steps=$steps,weight=$l_weight" --out "$OUT/trace.jsonl" || exit 1
export SERVE_ARGS=${SERVE_ARGS:---compile off --cuda-graphs off}
policy=${POLICY:-fcfs-elastic}
export ALONE_SAMPLE=${ALONE_SAMPLE:-12}  # images within 2/255 of the same request alone (gfdit bench alone)
NPROC=1 bash bench/serving_gpu.sh "$OUT/trace.jsonl" "unbatched=$policy:max_batch=1" \
  "batched=$policy:max_batch=${MAX_BATCH:-4}"
