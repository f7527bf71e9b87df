# Sourced by the device machine's scripts (tests/gpu/run_all.sh, tests/gpu/run_ipc.sh,
# bench/multigpu.sh): the environment every device run needs, $OUT, the carried wheels, and step().
# The sourcing script sets `log` (its file under $OUT) and prints "${summary[@]}" at its end.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
summary=()
step() {  # step NAME COMMAND...: runs, logs, records pass/fail
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$log"
  local t0=$SECONDS
  if "$@" >>"$log" 2>&1; then summary+=("PASS $name ($((SECONDS - t0)) s)"); else summary+=("FAIL $name ($((SECONDS - t0)) s)"); fi
}
use_wheels() {  # the packages carried in .whl/ (those the device machine lacks), installed once, on PYTHONPATH
  if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
}
