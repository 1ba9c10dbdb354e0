#!/bin/bash
# The GPU machine's whole session in one script: kernel-vs-twin parity tests, the MoE
# micro-benchmark (with the launch-shape sweep), and the end-to-end benchmark on a random-weight
# gpt-oss-20b (real shapes) written there. Every stage has its own time limit and writes its log
# into $OUT as it goes. Runs on Linux (CUDA) and stock macOS (Metal) alike: bash 3.2, no GNU
# coreutils (no `timeout`: run_for below stands in).
#
#   bash benchmarks/gpu_run.sh            (on the GPU machine, MLX importable; OUT=<dir for results>)
# At most 8 files come back from the device tool: the script writes exactly 8.
#   GX_LAYERS=2 GX_DRY=1 OUT=/tmp/out bash benchmarks/gpu_run.sh   (a rehearsal on any machine)
set -u

# run_for SECONDS CMD...: CMD with a time limit; TERM at the limit, KILL 5 s later; exit 124 on
# timeout, like GNU timeout. The watcher's output goes nowhere so it never holds a pipe open.
run_for() {
  local limit=$1 pid watcher rc
  shift
  "$@" &
  pid=$!
  # the mark goes down before the kill, so it is there when wait returns
  ( sleep "$limit"; touch "/tmp/gx-timeout.$pid"; kill -TERM "$pid" 2>/dev/null && { sleep 5; kill -KILL "$pid" 2>/dev/null; } ) >/dev/null 2>&1 &
  watcher=$!
  wait "$pid"
  rc=$?
  kill "$watcher" 2>/dev/null
  wait "$watcher" 2>/dev/null
  if [ -f "/tmp/gx-timeout.$pid" ]; then rm -f "/tmp/gx-timeout.$pid"; rc=124; fi
  return $rc
}
[ "${GX_SOURCE_ONLY:-}" = 1 ] && return 0 2>/dev/null  # sourced by the tests for run_for

OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/run.log"; }

CK=${GX_CKPT:-/tmp/gx-ckpt}
LAYERS=${GX_LAYERS:-24}

log "machine"
{ nvidia-smi -L 2>/dev/null; sysctl -n machdep.cpu.brand_string 2>/dev/null; python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device()); print(mx.device_info())"; } >>"$OUT/run.log" 2>&1

# The checkpoint is written in the background (CPU and disk) while the GPU tests run.
log "checkpoint: writing ($LAYERS layers) in the background"
( rm -rf "$CK"; mkdir -p "$CK" &&
  python3 benchmarks/make_checkpoint.py "$CK/release" --size 20b --layers "$LAYERS" &&
  python3 -m mlx_gptoss.cli convert "$CK/release" "$CK/converted" &&
  echo done >"$CK/READY" ) >"/tmp/gx-checkpoint.log" 2>&1 &

log "kernel self-check and micro-benchmark (doctor --kernels)"
run_for ${GX_DOCTOR_TIMEOUT:-120} python3 -m mlx_gptoss.cli doctor --kernels >>"$OUT/run.log" 2>&1
log "doctor --kernels: exit $?"

log "parity tests"
DRY=""; [ "${GX_DRY:-}" = 1 ] && DRY="GX_DRYRUN=1"
run_for ${GX_TEST_TIMEOUT:-90} env $DRY python3 -m pytest -q -rf -s -p no:cacheprovider tests/test_kernels_gpu.py tests/test_decode.py >"$OUT/tests.log" 2>&1
log "parity tests: exit $? ($(tail -1 "$OUT/tests.log"))"

log "moe micro-benchmark"
run_for ${GX_MOE_TIMEOUT:-150} python3 benchmarks/bench_moe.py ${GX_SWEEP:---sweep} --tokens ${GX_TOKENS:-1,4,16,128,2048} --reps 20 --json "$OUT/moe.json" >"$OUT/moe.log" 2>&1
log "moe micro-benchmark: exit $?"

for i in $(seq 1 ${GX_CKPT_WAIT:-120}); do [ -f "$CK/READY" ] && break; sleep 1; done
log "checkpoint ready: $(cat "$CK/READY" 2>/dev/null || echo NO); $(tail -3 /tmp/gx-checkpoint.log | tr '\n' ' ')"
du -sh "$CK"/* >>"$OUT/run.log" 2>&1

log "e2e: prompt 128, 64 decoded"
run_for ${GX_E2E_TIMEOUT:-200} python3 benchmarks/bench_e2e.py --release "$CK/release" --converted "$CK/converted" \
  --engines ${GX_ENGINES:-mlx-lm,mlx-gptoss,mlx-gptoss:compile,mlx-gptoss:twin} --prompt-tokens 128 --gen-tokens 64 --warmup-tokens 16 \
  --json "$OUT/e2e-128.json" >"$OUT/e2e-128.log" 2>&1
log "e2e 128: exit $?"

log "e2e: prompt 2048, 16 decoded"
run_for ${GX_E2E2_TIMEOUT:-120} python3 benchmarks/bench_e2e.py --release "$CK/release" --converted "$CK/converted" \
  --engines mlx-lm,mlx-gptoss --prompt-tokens 2048 --gen-tokens 16 --warmup-tokens 16 --prefill-step 2048 \
  --json "$OUT/e2e-2048.json" >"$OUT/e2e-2048.log" 2>&1
log "e2e 2048: exit $?"
log "end"
