#!/usr/bin/env bash
# The CPU fidelity table: tiny-flux on 4 CPU ranks, one trace per load, each replayed against a
# server per policy and simulated (gfdit eval fidelity). Run from the repository root:
#   bash bench/fidelity_cpu.sh OUT_DIR [POLICIES]
# OUT_DIR must hold tiny-flux-cpu4.json from:
#   OMP_NUM_THREADS=1 gfdit profile --nproc 4 --model tiny-flux --device cpu --sizes 32,144,256 \
#     --steps 5 --reps 5 --batch-sizes 1,2,3,4 --out OUT_DIR/tiny-flux-cpu4.json
# env LOAD_RANKS (4): the world size the trace's load is defined against. 4 is the formula
# (load = work / (4 ranks x window)); 4 ranks on a 2-core machine serve about half that, so every load
# >= 0.5 overloads it and latency is the length of a growing queue. LOAD_RANKS=2 defines the load
# against the cores instead (the rates halve). REPEATS (2): measurements of each trace per policy,
# each on a fresh server (the measurement's own spread, beside the simulator's error).
set -euo pipefail
out=$1
policies=${2:-"static:sp=1;edf-best-fit;srtf"}
export OMP_NUM_THREADS=1
prof=$out/tiny-flux-cpu4.json
# How one-rank steps slow down with k processes on the cores (the simulator's sharing curve)
[ -f "$out/concurrency.json" ] || python bench/fidelity_concurrency.py --model tiny-flux --sizes 32,144,256 \
  --procs 1,2,3,4,5 --seconds 3 --out "$out/concurrency.json"
classes=(--class S:size=32x32,steps=50,weight=1 --class M:size=144x144,steps=50,weight=1
         --class L:size=256x256,steps=50,weight=1)
for load in 0.5 0.8 1.0; do
  trace=$out/trace-load$load.jsonl
  # ~130 requests (at least 100): duration = 130 / rate, rate from the load (printed by a dry generation)
  gfdit bench gen --model tiny-flux "${classes[@]}" --alpha 3 --cost-profile "$prof" \
    --target-load "$load" --world-size "${LOAD_RANKS:-4}" --duration 1 --seed 0 --out "$trace" >/dev/null
  rate=$(python3 -c "import json; print(json.loads(open('$trace').readline())['meta']['spec']['mean_rate'])")
  duration=$(python3 -c "print(round(130 / $rate, 3))")
  gfdit bench gen --model tiny-flux "${classes[@]}" --alpha 3 --cost-profile "$prof" \
    --target-load "$load" --world-size "${LOAD_RANKS:-4}" --duration "$duration" --seed 0 --out "$trace"
  gfdit eval fidelity --trace "$trace" --policies "$policies" --chunk-steps 5 \
    --serve-args "--nproc 4 --model tiny-flux --device cpu --cost-profile $prof --chunk-steps 5 --max-queue 1000" \
    --cost-profile "$prof" --calibrate-overhead --cpu-cores 2 --sharing "$out/concurrency.json" \
    --repeats "${REPEATS:-2}" --out "$out/load$load"
done
