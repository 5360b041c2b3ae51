#!/usr/bin/env bash
# Build .whl/ (git-ignored) on this CPU machine: the wheels a fresh lent GPU machine needs beside its own
# python3.12, torch and triton (it has no network). Carry it with the call (carry: [".whl"]); on the device,
# scripts/device_run.sh installs it with the line below (or run that line yourself first):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD
#
#   scripts/build_wheels.sh            # core + tests + pandas (what device_run.sh's stages and backend=both import)
#   scripts/build_wheels.sh core       # only the groups named: core, tests, pandas, numpy
#
# Groups: core (sim/, real/, the benchmarks and Hydra apps), tests (pytest and hypothesis, which tests/conftest.py
# imports), pandas (experiments.* results tables: backend=both runs, bench_validation sweeps), numpy (only for a
# machine without it; the lent ones have it). Not carried: scipy, matplotlib (fits and plots run on this machine).
# Versions are those the project's venv resolved (pip show, 2026-12-06); binary wheels are for CPython 3.12, x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
groups=${*:-core tests pandas}
core="hydra-core==1.3.8 omegaconf==2.3.1 PyYAML==6.0.4 packaging==26.4 simpy==4.1.2
      hydra-joblib-launcher==1.2.0 joblib==1.5.3 tqdm==4.70.1 safetensors==0.8.0"
tests="pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 Pygments==2.21.0 hypothesis==6.170.27 sortedcontainers==2.4.0"
pandas="pandas==3.1.1 python-dateutil==2.9.0.post0 six==1.17.0"
numpy="numpy==2.4.6"
pins=""
for g in $groups; do
  case $g in
    core) pins+=" $core" ;; tests) pins+=" $tests" ;; pandas) pins+=" $pandas" ;; numpy) pins+=" $numpy" ;;
    *) echo "unknown group '$g'. Fix: one or more of core tests pandas numpy" >&2; exit 2 ;;
  esac
done
tmp=.whl.tmp; rm -rf "$tmp" && mkdir -p "$tmp"
# shellcheck disable=SC2086  # one pin a word
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$tmp" $pins
case " $groups " in *" core "*)   # omegaconf 2.3 needs antlr4 4.9.x, published as an sdist only: build its (pure) wheel
  python3 -m pip wheel -q --no-deps -w "$tmp" antlr4-python3-runtime==4.9.3 ;; esac
rm -rf .whl && mv "$tmp" .whl      # an old .whl/ stays until the new one is complete
ls -la .whl
echo "total: $(du -sh .whl | cut -f1) in $(ls .whl/*.whl | wc -l) wheels (a device call carries at most 64 MiB)"
