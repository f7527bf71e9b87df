#!/usr/bin/env bash
# Issue 15's one-GPU figures: `gfdit profile` (one rank, random bf16) of each model at its sizes —
# per-step time, ENCODE and DECODE times, memory per rank — eager unless FIG_FAST=1 (compiled +
# graph-replayed steps). One profile JSON and log per model under $OUT/figures; the table is built
# anywhere afterwards with `python bench/model_figures.py $OUT/figures`.
#   usage: bash bench/model_figures.sh "MODEL:SIZES[:FRAMES]" ...
#          e.g. "qwen-image:1024,1328" "wan2.2-ti2v-5b:1280x704:121" "wan2.2-t2v-a14b:832x480:81"
#   env: OUT, FIG_TIMEOUT (seconds per model, default 240), FIG_STEPS (3), FIG_REPS (1), FIG_FAST (0)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
OUT=${OUT:-$PWD/gpu-out}
dir="$OUT/figures"
mkdir -p "$dir"
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import gfcoll._gfcoll' 2>/dev/null || python3 -m pip install -q --no-build-isolation --no-deps -e . >"$dir/build.log" 2>&1
fast=(--compile off --cuda-graphs off)
tag=eager
if [ "${FIG_FAST:-0}" = 1 ]; then fast=(); tag=fast; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$dir/card.txt"
for spec in "$@"; do
  IFS=: read -r model sizes frames <<<"$spec"
  args=(--nproc 1 --model "$model" --sizes "$sizes" --steps "${FIG_STEPS:-3}" --reps "${FIG_REPS:-1}" "${fast[@]}")
  [ -n "${frames:-}" ] && args+=(--frames "$frames")
  t0=$SECONDS
  timeout "${FIG_TIMEOUT:-240}" python3 -m gfdit.cli profile "${args[@]}" --out "$dir/$model-$tag.json" \
    >"$dir/$model-$tag.log" 2>&1
  rc=$?
  echo "$model ($sizes${frames:+ x $frames frames}, $tag): rc $rc in $((SECONDS - t0)) s"
  grep -E "ms/step|encode|GiB|Error|error" "$dir/$model-$tag.log" | tail -6
done
