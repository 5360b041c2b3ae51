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
#   scripts/device_run.sh fidelity  flash files, quick calibrations, bench_fidelity.py run, a calibration after (issue 26;
#                                   ~7 min, untimed in this order); run name h200, or h100-heldout-<date> (env H100_RUN)
#                                   on an H100; env KIND overrides both
#   scripts/device_run.sh fullsize  random-init OPT-6.7B checkpoint: exactness test + real.generate (issue 27; ~6 min)
#   scripts/device_run.sh peers     bench_peers.py on that checkpoint (issue 27; ~5 min; after fullsize, same machine)
#   scripts/device_run.sh lookahead bench_engine.py look-ahead steps on the paper trace, 4 interleaved rounds (issue 28; ~9 min)
#   scripts/device_run.sh auto      fidelity on an H200 (the kind the software constants were not fitted on), else fullsize
#
# Outputs keep the tree's layout under $OUT: results/<name>.json + the table, logs/ (docs/benchmarks.md).
set -uo pipefail   # a failing step must not stop the others
stage=${1:?usage: scripts/device_run.sh check|engine|kernels}
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT/results" "$OUT/logs"
[ -d .whl ] || echo "no .whl/ here: hydra, simpy, ... will be missing. Fix: scripts/build_wheels.sh, then carry .whl" >&2
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:$PWD
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)
echo "$gpu"; df -h /root | tail -1
date -u
if [ "$stage" = auto ]; then case $gpu in *H200*) stage=fidelity ;; *) stage=fullsize ;; esac; echo "auto: $stage"; fi
export PYTHONUNBUFFERED=1
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
  fidelity)
    # the run's name: the GPU kind; on an H100 (the fit kind, whose row is in-sample) a held-out run on a fresh VM
    kind=${KIND:-$(case $gpu in *H200*) echo h200 ;; *H100*) echo "${H100_RUN:-h100-heldout-$(date -u +%m%d-%H%M)}" ;; *) echo gpu ;; esac)}
    # the flash files first (a fresh VM's disk reads faster after a minute of work: docs/fidelity.md), then two quick
    # calibrations: through the engine's loader (the profile predicted with) and the raw Python-thread probe (the
    # one engine-h100's read_efficiency was fitted against; `report --hardware` re-predicts with it)
    python3 benchmarks/bench_fidelity.py prepare --flash-dir /root/flash 2>&1 | tail -3
    # LEAN=1 (a short lease): the primary profile only, no threads table and no calibration after the points
    for reader in loader $([ -n "${LEAN:-}" ] || echo threads); do
      name=$kind-quick$([ $reader = threads ] && echo -threads)
      python3 -m real.calibrate /root/flash --quick --reader $reader --name "$name" --out "$OUT/results/$name.yaml" \
        --no-progress 2>&1 | tail -3
    done
    python3 benchmarks/bench_fidelity.py run --hardware "$OUT/results/$kind-quick.yaml" --software "${SOFTWARE:-engine-h100}" \
      --flash-dir /root/flash --run "$kind" --out-dir "$OUT/b" --time-limit "${LIMIT:-400}" 2>&1 | tee "$OUT/logs/fidelity-$kind.log" | tail -30
    # $OUT returns 8 files at most, 2 levels down: the points, this run's table and summary, three profiles, the log
    # (the profiles' plots and the index stay behind: `report` remakes the index here)
    cp "$OUT"/b/validation/fidelity/*.json "$OUT"/b/results/fidelity-*.md "$OUT"/b/results/fidelity.json "$OUT/results/"
    # and the disk once more after the points: how far it moved while they ran (`report --hardware` with it)
    [ -n "${LEAN:-}" ] || python3 -m real.calibrate /root/flash --quick --name "$kind-quick-after" --out "$OUT/results/$kind-quick-after.yaml" \
      --no-progress 2>&1 | tail -2
    rm -f "$OUT"/results/*.png
    rm -rf /root/flash "$OUT/b"                      # the disk is 64 GiB: the checkpoint stages need the room
    ;;
  fullsize)
    FLASHLAB_FULLSIZE_MODEL=opt-6.7b FLASHLAB_FULLSIZE_DIR=/root/fullsize FLASHLAB_FULLSIZE_OUT="$OUT/results/fullsize_exactness.json" \
      python3 -m pytest -s -q -p no:cacheprovider tests/test_model_mode.py -k fullsize 2>&1 | tee "$OUT/logs/fullsize_exactness.log" | tail -30
    python3 -m real.generate /root/fullsize/ckpt-opt-6.7b-float16 --prompt "The" --max-new-tokens 8 --memory-budget 0.5 \
      --cache-dir /root/fullsize/flash --no-progress 2>&1 | tee "$OUT/logs/generate_opt-6.7b.log" | tail -8
    ;;
  lookahead)
    STEPS=${STEPS:-naive,wb+depth64,wb+depth64+lookahead,wb+freq+warm+depth64,wb+freq+warm+depth64+lookahead,wb+freq+warm+depth64+lookahead+nopipe}
    python3 benchmarks/bench_engine.py --trace opt-6.7b-paper-lookahead --hardware h100-calibrated --software engine-h100 \
      --at-probe-hardware "${PROBE_HW:-h100-quick}" --tokens "${TOKENS:-24}" --naive-tokens 2 --repeat "${REPEAT:-4}" \
      --steps "$STEPS" --time-limit "${LIMIT:-500}" --out-dir "$OUT" 2>&1 | tee "$OUT/logs/engine.log" | tail -45
    ;;
  peers)
    python3 benchmarks/bench_peers.py --model opt-6.7b --work /root/fullsize --out "$OUT" --no-progress 2>&1 \
      | tee "$OUT/logs/peers.log" | tail -30
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
date -u
