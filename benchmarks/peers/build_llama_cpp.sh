#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench and llama-quantize from a PyPI source distribution.
#
#   benchmarks/peers/build_llama_cpp.sh [CACHE_DIR]
#
# CACHE_DIR (default $PAGEDLLM_PEERS_DIR, else ~/.cache/pagedllm/peers) receives the sdist, its
# unpacked sources and the build; the binaries land in CACHE_DIR/build/bin. The only network access
# is `pip download` of the pinned sdist (skipped when it is already in CACHE_DIR): llama-cpp-python
# ships llama.cpp's sources under vendor/llama.cpp, and its convert_hf_to_gguf.py and gguf-py, which
# make_checkpoints.py uses. Idempotent: when the three binaries exist, nothing is built.
#
# Options: a Release build for this CPU (GGML_NATIVE=ON: -march=native), no OpenSSL, no tests or
# examples, static libraries, and llama.cpp's AMX kernels off (they die with SIGILL on the Intel hosts
# these benchmarks ran on). With GGML_NATIVE the GGML_AMX_* options alone do not keep AMX out (they
# only apply to non-native builds; -march=native turns AMX on where the CPU has it), so on a CPU that
# reports AMX the compiler also gets -mno-amx-tile -mno-amx-int8 -mno-amx-bf16.
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default: nproc), PIP (default: pip3).
set -euo pipefail

CACHE_DIR="${1:-${PAGEDLLM_PEERS_DIR:-$HOME/.cache/pagedllm/peers}}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"
PIP="${PIP:-pip3}"
TARGETS=(llama-server llama-bench llama-quantize)
SRC="$CACHE_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$CACHE_DIR/build"

mkdir -p "$CACHE_DIR"
have_all=1
for t in "${TARGETS[@]}"; do
    [[ -x "$BUILD/bin/$t" ]] || have_all=0
done
if [[ $have_all == 1 ]]; then
    echo "llama.cpp already built in $BUILD/bin: ${TARGETS[*]} (delete $BUILD to rebuild)"
    exit 0
fi

if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    sdist="$CACHE_DIR/llama_cpp_python-$VERSION.tar.gz"
    if [[ ! -f "$sdist" ]]; then
        echo "downloading the llama-cpp-python==$VERSION source distribution from PyPI"
        "$PIP" download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" \
            -d "$CACHE_DIR"
    fi
    tar -xzf "$sdist" -C "$CACHE_DIR"
    [[ -f "$SRC/CMakeLists.txt" ]] || { echo "error: $sdist holds no vendor/llama.cpp" >&2; exit 1; }
fi

CMAKE_ARGS=(
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
)
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_ARGS+=("-DCMAKE_C_FLAGS=$no_amx" "-DCMAKE_CXX_FLAGS=$no_amx")
    echo "this CPU has AMX: compiling with $no_amx"
fi

start=$(date +%s)
cmake -S "$SRC" -B "$BUILD" "${CMAKE_ARGS[@]}"
cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}"
echo "built ${TARGETS[*]} in $(( $(date +%s) - start )) s: $BUILD/bin"
