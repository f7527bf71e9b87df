#!/usr/bin/env bash
# The multi-GPU measurements (issues 17 and 18), one part per device call, each inside the device
# tool's 10 minutes; every part appends to $OUT/log.txt and prints a summary last. Run from the
# repository root on a node with several GPUs:
#   bash bench/multigpu.sh PART [ARGS]
# Issue 17 (gfcoll and SP step scaling):
#   tests                         build; tests/gpu on every GPU and the CUDA demo (tests/gpu/run_all.sh tests)
#   ipc-tests                     the ipc transport's tests with 2 and 4 ranks (tests/gpu/run_ipc.sh tests)
#   coll N [eager|graph] [T...]   gfcoll-bench on GPUs 0..N-1, 1 KiB-256 MiB (x4), --check, beside torch NCCL on a
#                                 dedicated group, once per gfcoll transport T (default: ipc nccl), eager runs
#                                 with the group-formation and first-use rows; then gfcoll.bench.targets over every
#                                 coll run so far ($OUT/coll/targets.md)
#   steps MODEL SIZES [DEGREES] [MODES]
#                                 gfdit profile of MODEL on every GPU at SIZES (comma-separated, WxH[xF]) and
#                                 DEGREES (default 1,2,4 or up to the GPUs), per mode (default "eager fast":
#                                 eager = --compile off --cuda-graphs off, fast = --compile regional
#                                 --cuda-graphs on), with the per-step breakdown; then bench/sp_scaling.py over
#                                 every profile so far ($OUT/steps/scaling.md); video: FRAMES=81, e.g.
#                                 FRAMES=81 bash bench/multigpu.sh steps wan2.1-14b 832x480,1280x720; more profile
#                                 options in PROFILE_EXTRA (e.g. "--cfg" for CFG-parallel steps, "--batch-sizes 1,2,4")
# Issue 18 (serving at load, a dead GPU):
#   trace MODEL MIX LOAD [N]      a trace of the named mix at LOAD for the GPUs, from the fast profile of MODEL
#                                 (run `steps` first), and gfdit tune on it: $OUT/fid/MODEL-MIX-LOAD/{trace.jsonl,
#                                 tune/, policies.txt} (fixed pipeline static:sp=N, best static, tetriserve, best elastic)
#   fidelity MODEL MIX LOAD K     serve policy K (1-4 of policies.txt, or a policy spec) on every GPU, replay the
#                                 trace and simulate it (gfdit eval fidelity); then bench/serving_targets.py over
#                                 every run so far ($OUT/fid/serving.md: the table and the serving targets)
#   dead T [MODEL]                bench/dead_rank.py: 4 GPUs, GFCOLL_TRANSPORT=T (nccl or ipc), rank 2 killed
#                                 KILL_AFTER (10) s into a load-0.8 paper-image trace of MODEL (default flux-dev;
#                                 DEAD_TRACE: other gen options); SHARE_GPUS=1: 4 ranks on fewer GPUs (ipc only)
# Order (what the targets of later parts rest on first; one call each, OUT=$OUT/<name> kept across calls on
# one warm machine, or the earlier folders carried back): tests; coll 4 eager; coll 4 graph; coll 2 eager;
# steps flux-dev 512,1024,2048 1,2,4 eager; steps flux-dev 512,1024,2048 1,2,4 fast; trace flux-dev paper-image
# 0.8 (CPU only: may run anywhere with the fast profile); fidelity flux-dev paper-image 0.8 1..4; dead nccl;
# dead ipc; then loads 0.5 and 1.0, 8 GPUs, FRAMES=81 steps wan2.1-14b 832x480,1280x720, the paper-video mix.
# Env: OUT (./gpu-out), ITERS (20), MAXBYTES (256M), SERVE_EXTRA (more gfdit serve options), REQUESTS (100
#      per trace); a dry run of coll on fewer GPUs than ranks: SHARE_GPUS=1 BASELINE=0 (ipc only: NCCL refuses
#      two ranks on one GPU, the torch baseline too).
set -uo pipefail
part=${1:?usage: bash bench/multigpu.sh PART [ARGS] (see the header)}; shift
source "$(dirname "${BASH_SOURCE[0]}")/../tests/gpu/device_env.sh"
log="$OUT/log.txt"
finish() {
  echo "=== summary ($part)" | tee -a "$log"
  printf '%s\n' "${summary[@]}" | tee -a "$log"
}
use_wheels
if ! python3 -c 'import gfcoll._gfcoll' 2>/dev/null; then
  step build python3 -m pip install -q --no-build-isolation --no-deps -e .
fi
ngpu=$(nvidia-smi -L | wc -l)
{
  echo "--- $part $* ($(date -u +%FT%TZ), commit $(git rev-parse HEAD 2>/dev/null), $(git status --porcelain 2>/dev/null | wc -l) changed paths)"
  nvidia-smi -L
} >>"$log" 2>&1
[ -f "$OUT/topo.txt" ] || nvidia-smi topo -m >"$OUT/topo.txt" 2>&1
degrees() {  # 1,2,4,... up to the GPUs
  local d=1 out=1
  while [ $((d * 2)) -le "$ngpu" ]; do d=$((d * 2)); out="$out,$d"; done
  echo "$out"
}

case $part in
tests)
  OUT=$OUT/tests bash tests/gpu/run_all.sh tests; rc=$?
  summary+=("$([ $rc = 0 ] && echo PASS || echo FAIL) tests/gpu/run_all.sh tests (see $OUT/tests/log.txt)")
  ;;
ipc-tests)
  OUT=$OUT/ipc bash tests/gpu/run_ipc.sh tests; rc=$?
  summary+=("$([ $rc = 0 ] && echo PASS || echo FAIL) tests/gpu/run_ipc.sh tests (see $OUT/ipc)")
  ;;
coll)
  n=${1:?coll N}; mode=${2:-eager}; shift $(($# < 2 ? $# : 2))
  transports=${*:-ipc nccl}
  visible=$(seq -s, 0 $((n - 1)))
  if [ "${SHARE_GPUS:-0}" = 1 ]; then visible=$(seq -s, 0 $((ngpu - 1)));  # ranks share the GPUs (ipc only)
  elif [ "$n" -gt "$ngpu" ]; then echo "coll $n: only $ngpu GPUs (SHARE_GPUS=1: ranks share them, ipc only)"; exit 2; fi
  mkdir -p "$OUT/coll"
  for t in $transports; do
    args=(-b 1K -e "${MAXBYTES:-256M}" -f 4 --iters "${ITERS:-20}" --warmup 5 --check)
    if [ "$mode" = graph ]; then args+=(--graph --no-formation); fi
    [ "${BASELINE:-1}" = 0 ] && args+=(--no-baseline)
    name=$n-$t-$mode
    # 2 GiB of ipc workspace: all_to_all stages its whole send buffer (256 MiB), a graph's arena is a quarter
    step "coll_$name" timeout 280 env GFCOLL_TRANSPORT="$t" GFCOLL_IPC_BYTES=$((2 << 30)) CUDA_VISIBLE_DEVICES="$visible" \
      torchrun --standalone --nproc-per-node "$n" -m gfcoll.bench "${args[@]}" --json "$OUT/coll/$name.json"
    [ -f "$OUT/coll/results.md" ] && mv "$OUT/coll/results.md" "$OUT/coll/$name.md"
  done
  step targets python3 -m gfcoll.bench.targets "$OUT"/coll/[0-9]*-*-*.json --out "$OUT/coll/targets.md" --json "$OUT/coll/targets.json"
  ;;
steps)
  model=${1:?steps MODEL SIZES}; sizes=${2:?steps MODEL SIZES}; degs=${3:-$(degrees)}; modes=${4:-eager fast}
  mkdir -p "$OUT/steps/breakdown"
  for m in $modes; do
    case $m in
      eager) flags=(--compile off --cuda-graphs off) ;;
      fast) flags=(--compile regional --cuda-graphs on) ;;
      *) echo "unknown mode $m (eager or fast)"; exit 2 ;;
    esac
    tag=$model-$(echo "$sizes" | tr ',' '_')${FRAMES:+x$FRAMES}-$m
    step "profile_$tag" timeout 540 python3 -m gfdit.cli profile --nproc "$ngpu" --model "$model" --sizes "$sizes" \
      --degrees "$degs" --steps 5 --reps 3 ${FRAMES:+--frames "$FRAMES"} ${PROFILE_EXTRA:-} "${flags[@]}" --breakdown "$OUT/steps/breakdown/$tag" --out "$OUT/steps/$tag.json"
  done
  step scaling python3 bench/sp_scaling.py "$OUT"/steps/*.json --out "$OUT/steps/scaling.md" --json "$OUT/steps/scaling.json"
  ;;
trace)
  model=${1:?trace MODEL MIX LOAD}; mix=${2:?}; load=${3:?}; n=${4:-$ngpu}
  prof=$(ls "$OUT"/steps/"$model"-*-fast.json 2>/dev/null | head -1)
  [ -n "$prof" ] || { echo "no fast profile of $model under $OUT/steps: run the steps part first"; exit 2; }
  dir=$OUT/fid/$model-$mix-$load; mkdir -p "$dir"
  gen=(python3 -m gfdit.cli bench gen --model "$model" --mix "$mix" --cost-profile "$prof" --target-load "$load"
       --world-size "$n" --seed 0 --out "$dir/trace.jsonl")
  "${gen[@]}" --duration 1 >/dev/null || exit 1
  rate=$(python3 -c "import json; print(json.loads(open('$dir/trace.jsonl').readline())['meta']['spec']['mean_rate'])")
  step gen "${gen[@]}" --duration "$(python3 -c "print(round(${REQUESTS:-100} / $rate, 3))")"
  static=$(ngpu=$n degrees | tr ',' '|')
  step tune python3 -m gfdit.cli tune --trace "$dir/trace.jsonl" --world-size "$n" --cost-profile "$prof" \
    --search "static:sp=$static" --search "edf-best-fit:chunk=1|2|4" --search "step-preempt" --search "load-adaptive" \
    --search "srtf" --search "sjf" --baseline tetriserve --baseline rssp --objective slo --out "$dir/tune"
  python3 - "$dir" "$n" <<'EOF' | tee -a "$log"
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
cands = [c["spec"] for c in json.load(open(f"{d}/tune/results.json"))["candidates"]]
best_static = next(c for c in cands if c.startswith("static"))
best_elastic = next(c for c in cands if not c.startswith(("static", "tetriserve", "rssp")))
policies = [f"static:sp={n}", best_static, "tetriserve", best_elastic]
open(f"{d}/policies.txt", "w").write("\n".join(policies) + "\n")
print("policies:", policies)
EOF
  ;;
fidelity)
  model=${1:?fidelity MODEL MIX LOAD K}; mix=${2:?}; load=${3:?}; k=${4:?}
  dir=$OUT/fid/$model-$mix-$load
  [ -f "$dir/policies.txt" ] || { echo "run the trace part first ($dir/policies.txt)"; exit 2; }
  roles=(k1-fixed k2-best-static k3-tetriserve k4-best-elastic)
  case $k in [1-4]) policy=$(sed -n "${k}p" "$dir/policies.txt"); label=${roles[$((k - 1))]} ;;
             *) policy=$k; label=$(echo "$policy" | tr -c 'A-Za-z0-9_.=-' '_') ;; esac
  prof=$(ls "$OUT"/steps/"$model"-*-fast.json | head -1)
  warm=$(python3 -c "
import json; m = json.loads(open('$dir/trace.jsonl').readline())['meta']['spec']
print(','.join(sorted({f\"{c['width']}x{c['height']}\" + (f\"x{c['num_frames']}\" if c['num_frames'] else '') for c in m['classes']})))")
  step "fidelity_$label" timeout 570 python3 -m gfdit.cli eval fidelity --trace "$dir/trace.jsonl" --policies "$policy" \
    --chunk-steps 2 --cost-profile "$prof" --calibrate-overhead --health-timeout 400 --out "$dir/$label" \
    --serve-args "--nproc $ngpu --model $model --cost-profile $prof --chunk-steps 2 --max-queue 1000 --compile regional --cuda-graphs on --warm-sizes $warm ${SERVE_EXTRA:-}"
  find "$dir" -name 'tasks*.jsonl' -exec gzip -f {} +
  step serving_targets python3 bench/serving_targets.py "$OUT/fid" --out "$OUT/fid/serving.md" --json "$OUT/fid/serving.json"
  ;;
dead)
  t=${1:?dead nccl|ipc}; model=${2:-flux-dev}
  visible=0,1,2,3
  if [ "${SHARE_GPUS:-0}" = 1 ]; then visible=$(seq -s, 0 $((ngpu - 1)));  # 4 ranks share the GPUs (ipc only)
  elif [ "$ngpu" -lt 4 ]; then echo "dead: needs 4 GPUs (SHARE_GPUS=1: ranks share them, ipc only)"; exit 2; fi
  prof=$(ls "$OUT"/steps/"$model"-*-fast.json 2>/dev/null | head -1)
  dir=$OUT/dead; mkdir -p "$dir"
  if [ ! -f "$dir/trace.jsonl" ]; then
    # DEAD_TRACE: other `gfdit bench gen` arrivals and classes (e.g. for a tiny model)
    # shellcheck disable=SC2086
    python3 -m gfdit.cli bench gen --model "$model" ${DEAD_TRACE:---mix paper-image --target-load 0.8 --world-size 4 --duration 40} \
      ${prof:+--cost-profile "$prof"} --seed 1 --out "$dir/trace.jsonl" >>"$log" 2>&1 || exit 1
  fi
  step "dead_$t" timeout 570 env GFCOLL_TIMEOUT_S=10 CUDA_VISIBLE_DEVICES="$visible" python3 bench/dead_rank.py \
    --trace "$dir/trace.jsonl" --victim 2 --kill-after "${KILL_AFTER:-10}" --transport "$t" --out "$dir/$t" --health-timeout 400 \
    --serve-args "--nproc 4 --model $model --policy edf-best-fit ${prof:+--cost-profile $prof} --chunk-steps 2 --max-queue 1000 ${SERVE_EXTRA:-}"
  [ -f "$dir/$t/dead_rank.md" ] && cat "$dir/$t/dead_rank.md"
  ;;
*)
  sed -n 2,30p "$0"; exit 2 ;;
esac
finish
grep -q '^FAIL' <(printf '%s\n' "${summary[@]}") && exit 1
exit 0
