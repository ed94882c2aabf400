#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh installs on the GPU machine (Python 3.12, x86-64, no network):
# megatron-core 0.19.2 (the newest 0.19.x, what setup.py gives Python >= 3.12) and 0.16.1 (what the CPU
# tests use; the fallback). Their Requires-Dist (torch, numpy, packaging) are already on that machine.
# Run here, in any environment with pip and network; the device tool then takes them with carry [".whl"].
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in megatron-core==0.19.2 megatron-core==0.16.1; do
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done
for whl in .whl/*.whl; do
  echo "$(du -h "$whl" | cut -f1)  $whl  needs: $(unzip -p "$whl" '*/METADATA' | grep '^Requires-Dist' | grep -v extra | cut -d' ' -f2- | tr '\n' ' ')"
done
