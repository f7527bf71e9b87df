#!/usr/bin/env bash
# On the device machine, from the repository root: build, then run the ipc transport's tests with 2
# and 4 ranks on however many GPUs there are (one GPU suffices: ranks share it), then the host-time
# benchmark. Logs go under $OUT (default ./gpu-out); a short summary is printed last.
#   usage: bash tests/gpu/run_ipc.sh [tests|bench|all] [pytest -k expression]
#   env: IPC_MAXFAIL (4), IPC_TEST_TIMEOUT (400 s a test), IPC_TOTAL_TIMEOUT (560 s), HOST_TIME_ITERS;
#        IPC_SEGV_TRACE=1: the tests run with tests/gpu/diag/segv_trace.so preloaded, and any native crash
#        backtrace is resolved into $OUT/ipc-crashes-resolved.txt (build with
#        SKBUILD_CMAKE_BUILD_TYPE=RelWithDebInfo for gfcoll's file and line numbers)
set -uo pipefail
what=${1:-all}
select=${2:-}
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
log="$OUT/ipc-gpu-tests.log"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) (working tree as sent: $(git status --porcelain 2>/dev/null | wc -l) changed paths)"
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} >>"$log" 2>&1
step build python3 -m pip install -q --no-build-isolation --no-deps -e .
step build_info python3 -c 'import gfcoll, json; print(json.dumps(gfcoll.build_info()))'
{  # How the module links the C++ runtime (a static copy inside it once broke iostreams: error.h).
  so=$(python3 -c 'import gfcoll._gfcoll as m; print(m.__file__)')
  readelf -d "$so" | grep NEEDED
  echo "libstdc++ objects inside the module: $(strings "$so" | grep -c 'lt1-\|codecvt')"
  echo "LDFLAGS=${LDFLAGS:-} CXXFLAGS=${CXXFLAGS:-}"
} >>"$log" 2>&1
if [ "$what" = all ] || [ "$what" = tests ]; then
  # Short per-test bounds and --maxfail, so that pytest's failure report is written before the
  # outer timeout ends it.
  args=(-v -rs --tb=short --maxfail="${IPC_MAXFAIL:-4}" -p no:cacheprovider --timeout "${IPC_TEST_TIMEOUT:-400}"
    tests/gpu/test_ipc_transport.py)
  [ -n "$select" ] && args+=(-k "$select")
  preload=()
  if [ "${IPC_SEGV_TRACE:-0}" = 1 ] && cc -O1 -g -fPIC -shared -o /tmp/segv_trace.so tests/gpu/diag/segv_trace.c; then
    preload=(env LD_PRELOAD=/tmp/segv_trace.so)
  fi
  step ipc_tests "${preload[@]}" timeout "${IPC_TOTAL_TIMEOUT:-560}" python3 -m pytest "${args[@]}"
  if grep -q "^\[segv_trace\]" "$log"; then
    python3 tests/gpu/diag/resolve_frames.py "$log" >"$OUT/ipc-crashes-resolved.txt" 2>&1
    grep -A30 "segv_trace\]" "$OUT/ipc-crashes-resolved.txt" | grep -v "^  /usr\|libc\|libpython" | head -40
  fi
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  for n in 2 4; do
    step "host_time_$n" timeout 120 python3 -m torch.distributed.run --nproc-per-node "$n" -m gfcoll.bench \
      --host-time -n "${HOST_TIME_ITERS:-2000}" --json "$OUT/host-time-$n.json"
  done
fi
echo "=== summary" | tee -a "$log"
printf '%s\n' "${summary[@]}" | tee -a "$log"
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$log" | tail -30
