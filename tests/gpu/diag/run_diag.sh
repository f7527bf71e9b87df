#!/usr/bin/env bash
# On the device machine, from the repository root: the ipc diagnostics. Builds, probes whether
# stream waits of one process progress independently across its streams (bench/ipc_stream_waits.py),
# runs the killed-peer test with native crash backtraces (segv_trace.so, resolved with addr2line),
# then the ipc tests named in $DIAG_TESTS. Everything goes to $OUT (default ./gpu-out).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} >"$OUT/diag-env.txt" 2>&1
t0=$SECONDS
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build $((SECONDS - t0)) s"
if [ "${DIAG_PROBE:-1}" = 1 ]; then
  timeout 120 python3 bench/ipc_stream_waits.py --bound 3 >"$OUT/stream-waits.jsonl" 2>"$OUT/stream-waits.err"
  echo "probe rc $?"; cat "$OUT/stream-waits.jsonl"; tail -5 "$OUT/stream-waits.err"
fi
if [ -n "${DIAG_KILLED:-1}" ] && [ "${DIAG_KILLED:-1}" != 0 ]; then
  cc -O1 -g -fPIC -shared -o /tmp/segv_trace.so tests/gpu/diag/segv_trace.c
  LD_PRELOAD=/tmp/segv_trace.so timeout 150 python3 -m pytest -x -s -p no:cacheprovider --timeout 120 \
    "tests/gpu/test_ipc_transport.py::test_killed_peer_ends_waits_with_error" >"$OUT/killed-peer.log" 2>&1
  echo "killed-peer rc $?"
  python3 tests/gpu/diag/resolve_frames.py "$OUT/killed-peer.log" >"$OUT/killed-peer-resolved.txt" 2>&1
  grep -A40 "segv_trace\]" "$OUT/killed-peer-resolved.txt" | head -60
  grep -E "passed|failed|rank .*\]" "$OUT/killed-peer.log" | tail -12
fi
if [ -n "${DIAG_TESTS:-}" ]; then
  timeout "${DIAG_TESTS_TIMEOUT:-300}" python3 -m pytest -v -rs --tb=short -p no:cacheprovider --timeout 200 \
    tests/gpu/test_ipc_transport.py -k "$DIAG_TESTS" >"$OUT/diag-tests.log" 2>&1
  echo "tests rc $?"
  grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" "$OUT/diag-tests.log" | tail -20
fi
if [ "${DIAG_HOST_TIME:-0}" = 1 ]; then
  for n in 2 4; do
    timeout 100 python3 -m torch.distributed.run --nproc-per-node "$n" -m gfcoll.bench --host-time \
      -n "${HOST_TIME_ITERS:-1000}" --json "$OUT/host-time-$n.json" >"$OUT/host-time-$n.log" 2>&1
    echo "host-time $n rc $?"; grep -E "^\|" "$OUT/host-time-$n.log" | head -12
  done
fi
