#!/usr/bin/env bash
# The device check of issue 16 in one call (at most 10 minutes on an H100/H200, no network):
# build erllama with ERLLAMA_CUDA=1 from the carried llama.cpp source with the system g++,
# show `erllama doctor`, then run bench/gpu_check.py (cold / ram / resident TTFT, state
# copies, save stalls, exactness) and leave gpu_check.json and gpu_check.md in $OUT.
# Prepare the carried paths here first: bench/gpu_prepare.sh; then run on the device with
# carry [".whl", ".llama"]:  bash bench/gpu_check.sh
# Dry run on a machine without a GPU: ERLLAMA_CUDA=auto GPU_CHECK_ARGS=--small bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/erllama-site .whl/*.whl
export PYTHONPATH=/tmp/erllama-site:$PWD
rm -rf /tmp/erllama-llama && mkdir -p /tmp/erllama-llama && tar -C /tmp/erllama-llama -xJf .llama/llama.cpp.tar.xz
export ERLLAMA_LLAMA_CPP_DIR=/tmp/erllama-llama/llama.cpp ERLLAMA_CUDA=${ERLLAMA_CUDA:-1}
export ERLLAMA_BUILD_CACHE=${ERLLAMA_BUILD_CACHE:-/tmp/erllama-build}
# the system compiler: another GCC first on the path linked libstdc++ statically (GPU.md)
export CC=${CC:-/usr/bin/gcc} CXX=${CXX:-/usr/bin/g++} CUDAHOSTCXX=${CUDAHOSTCXX:-/usr/bin/g++}
t0=$(date +%s)
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"
python3 -c "from erllama.cli import main; main(['doctor'])" 2>&1 | tee "$OUT/doctor.txt"
timeout "${GPU_CHECK_TIMEOUT:-420}" python3 bench/gpu_check.py --out "$OUT" ${GPU_CHECK_ARGS:-} 2>&1 \
    | grep -v '^llama_\|^load\|^print_info' | tee "$OUT/gpu_check.log"
