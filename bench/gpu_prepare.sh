#!/usr/bin/env bash
# Prepares, here, what bench/gpu_check.sh needs on a device machine that has no network:
# the pure-Python wheels erllama needs beyond the machine's own packages (.whl) and the
# pinned llama.cpp source, trimmed (.llama). Both are git-ignored (.git/info/exclude) and
# travel with the run as `carry` paths. Run in the repository root after `make install`
# (which fetched and verified the source into deps/llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
for d in /.whl/ /.llama/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
[ -f deps/llama.cpp/include/llama.h ] || { echo "deps/llama.cpp is missing: run make install first" >&2; exit 2; }
rm -rf .whl .llama && mkdir -p .whl .llama
# the device has numpy, msgpack, psutil, Cython, CMake and ninja (../shared/GPU.md); pykka is pure Python
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "pykka==4.5.0"
tar -C deps -cJf .llama/llama.cpp.tar.xz --exclude=llama.cpp/models --exclude=llama.cpp/docs \
    --exclude=llama.cpp/tools --exclude=llama.cpp/examples --exclude=llama.cpp/media \
    --exclude=llama.cpp/.github --exclude=llama.cpp/.devops --exclude=llama.cpp/tests llama.cpp
du -sh .whl .llama
