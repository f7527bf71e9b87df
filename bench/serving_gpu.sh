#!/usr/bin/env bash
# The serving benchmark on a GPU machine: for each LABEL=POLICY, start `gfdit serve` on all GPUs of
# this node, wait for /health, warm every (class size, degree) the policy may use, replay TRACE with
# `gfdit bench run`, scrape /metrics, stop the server with SIGTERM (it drains). Each run lands in
# $OUT/LABEL.tar.gz (results.jsonl, run.json, metrics.txt, server.log); the log in $OUT/serving.log.
# Report afterwards anywhere: gfdit bench report DIR... --out REPORT.
#   usage: bash bench/serving_gpu.sh TRACE LABEL=POLICY [LABEL=POLICY ...]
#   env: MODEL (flux-dev), NPROC (all GPUs), PORT (8321), SERVE_ARGS (more gfdit.serve options),
#        HEALTH_TIMEOUT (600 s to become healthy; every 90 s of waiting the ranks' stacks go to server.log),
#        WARMUP (1: one short request per class alone, then one per class all at once; 0: none),
#        ALONE_SAMPLE (N: the run saves its images and N of them are compared with the same requests
#        sent again alone, `gfdit bench alone`, into LABEL/alone.json; default: none)
set -uo pipefail
[ $# -ge 2 ] || { sed -n 2,10p "$0"; exit 2; }
trace=$1; shift
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-$PWD/gpu-out}
MODEL=${MODEL:-flux-dev}
PORT=${PORT:-8321}
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
WARMUP=${WARMUP:-1}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}
url="http://127.0.0.1:$PORT"
mkdir -p "$OUT"
log="$OUT/serving.log"
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c 'import gfcoll._gfcoll' 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . >>"$log" 2>&1 || { echo "build failed"; tail -30 "$log"; exit 1; }
fi
python3 -c 'import gfcoll, json; print(json.dumps(gfcoll.build_info()))' | tee -a "$log"
nvidia-smi -L | tee -a "$log"

warm() {  # warm(): the trace's classes, first alone (degree NPROC under most policies), then together
  python3 - "$trace" "$url" <<'EOF'
import asyncio, json, sys, time
import httpx
trace, url = sys.argv[1], sys.argv[2]
with open(trace) as f:
    meta = json.loads(f.readline())["meta"]
classes = meta["spec"]["classes"]
def body(c):
    return {"model": meta["spec"]["model"], "prompt": "warm-up", "size": f"{c['width']}x{c['height']}",
            "num_inference_steps": 2, "seed": 1}
async def main():
    async with httpx.AsyncClient(base_url=url, timeout=600) as cl:
        for c in classes:
            t = time.perf_counter()
            r = await cl.post("/v1/images/generations", json=body(c))
            print(f"warm {c['name']} alone: {r.status_code} {time.perf_counter() - t:.2f} s", flush=True)
        t = time.perf_counter()
        rs = await asyncio.gather(*(cl.post("/v1/images/generations", json=body(c)) for c in classes * 2))
        print(f"warm all together: {[r.status_code for r in rs]} {time.perf_counter() - t:.2f} s", flush=True)
asyncio.run(main())
EOF
}

status=0
for spec in "$@"; do
  label=${spec%%=*}; policy=${spec#*=}
  dir="$OUT/$label"; mkdir -p "$dir"
  echo "=== $label: policy $policy, $MODEL on $NPROC ranks ($(date -u +%FT%TZ))" | tee -a "$log"
  t0=$SECONDS
  # shellcheck disable=SC2086
  python3 -m gfdit.cli serve --nproc "$NPROC" --model "$MODEL" --device ${DEVICE:-cuda} --policy "$policy" \
    --port "$PORT" ${SERVE_ARGS:-} >"$dir/server.log" 2>&1 &
  pid=$!
  ready=0
  while [ $((SECONDS - t0)) -lt "$HEALTH_TIMEOUT" ]; do
    if python3 -c "import httpx,sys; sys.exit(httpx.get('$url/health', timeout=2).status_code != 200)" 2>/dev/null; then
      ready=1; break
    fi
    kill -0 $pid 2>/dev/null || break
    if [ $(((SECONDS - t0) % 90)) -lt 2 ] && [ $((SECONDS - t0)) -gt 2 ]; then  # still loading: stacks to server.log
      for p in $(pgrep -f "gfdit.serve"); do
        grep -q torch.distributed.run "/proc/$p/cmdline" 2>/dev/null || kill -USR1 "$p" 2>/dev/null
      done
      sleep 2
    fi
    sleep 1
  done
  if [ $ready = 0 ]; then
    echo "server did not become healthy" | tee -a "$log"; tail -40 "$dir/server.log" | tee -a "$log"
    kill -TERM $pid 2>/dev/null; wait $pid; status=1; continue
  fi
  echo "healthy after $((SECONDS - t0)) s" | tee -a "$log"
  [ "$WARMUP" = 1 ] && warm 2>&1 | tee -a "$log"
  python3 -m gfdit.cli bench run --url "$url" --trace "$trace" --out "$dir" --label "$label" \
    ${ALONE_SAMPLE:+--save-images} 2>&1 | tee -a "$log" || status=1
  if [ -n "${ALONE_SAMPLE:-}" ]; then
    python3 -m gfdit.cli bench alone --url "$url" --run "$dir" --sample "$ALONE_SAMPLE" 2>&1 | tee -a "$log"
    rm -rf "$dir/images"  # alone.json keeps the differences; the images would bloat the results
  fi
  python3 -c "import httpx; print(httpx.get('$url/metrics').text)" >"$dir/metrics.txt" 2>&1
  grep -E '^gfdit_(reshard|requests_total|slo|rank_busy)' "$dir/metrics.txt" | tee -a "$log"
  kill -TERM $pid
  wait $pid; echo "server exit $? after $((SECONDS - t0)) s" | tee -a "$log"
  tail -5 "$dir/server.log" >>"$log"
  (cd "$OUT" && tar czf "$label.tar.gz" "$label" && rm -rf "$label")
done
exit $status
