#!/usr/bin/env bash
# One call on the lent GPU machine (no network): install the carried wheels (.whl/, git-ignored) next to the
# machine's own torch/triton, then run one stage; everything it writes goes to $OUT (default ./device-out).
#
# The wheels: build them here first with scripts/build_wheels.sh (~17 MiB), and carry them with the call:
#   run(command="scripts/device_run.sh check", carry=[".whl"])
# This script installs them with the line below; to use them in any other command on the device, start it with it:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD
#
#   scripts/device_run.sh check    GPU tests of the loader/engine paths, the body's kernels, the kernel floor, the engine profile
#   scripts/device_run.sh engine   the full-model engine benchmark (STEPS below, --repeat 2)
#   scripts/device_run.sh kernels  the kernel benchmark (issue 5's tables)
#
# Outputs keep the tree's layout under $OUT: results/<name>.json + the table, logs/ (docs/benchmarks.md).
set -uo pipefail   # a failing step must not stop the others
stage=${1:?usage: scripts/device_run.sh check|engine|kernels}
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT/results" "$OUT/logs"
[ -d .whl ] || echo "no .whl/ here: hydra, simpy, ... will be missing. Fix: scripts/build_wheels.sh, then carry .whl" >&2
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
date -u
case $stage in
  check)
    python3 -m pytest -q -p no:cacheprovider tests/test_loader.py tests/test_engine.py -k "cuda or gated or device_wait or body" \
      2>&1 | tail -15
    python3 benchmarks/bench_body.py --out "$OUT" 2>&1 | tail -25
    python3 benchmarks/bench_kernels.py --sections check --out "$OUT/kcheck" 2>&1 | grep -E "FAIL|rror|correctness" | tail -8
    python3 benchmarks/probes/kernel_floor.py --out "$OUT" 2>&1 | tail -25
    python3 benchmarks/probes/profile_engine.py --out "$OUT/results/engine_profile.txt" 2>&1 | tail -40
    ;;
  engine)
    STEPS=${STEPS:-naive,windowing_bundling,wb+lfu+depth64,wb+freq+warm+depth64}
    python3 benchmarks/bench_engine.py --repeat "${REPEAT:-2}" --steps "$STEPS" --time-limit "${LIMIT:-520}" \
      --out-dir "$OUT" 2>&1 | tee "$OUT/logs/engine.log" | tail -40
    ;;
  kernels)
    python3 benchmarks/bench_kernels.py --out "$OUT" ${KERNEL_ARGS:-} 2>&1 | tail -40   # its log: $OUT/logs/kernels.log
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
date -u
