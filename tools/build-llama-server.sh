#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` once per machine: the OpenAI-compatible server the engine tests
# run against (issue 16), a real server no one here wrote. llama.cpp is MIT; its source comes from the
# llama-cpp-python sdist on PyPI (MIT, vendors llama.cpp), since PyPI ships llama.cpp only as source.
#
# The binary goes to a cache outside the clone, keyed by the source version, so later clones on the
# same machine (CI) skip the ~11-minute build:
#     ${NSDG_TOOLS_CACHE:-$HOME/.cache/nemotron-sdg}/llama-server/<version>/llama-server
# Prints that path on its last line. Idempotent; safe to run from several clones at once (flock).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${NSDG_TOOLS_CACHE:-$HOME/.cache/nemotron-sdg}/llama-server/$VERSION"
BIN="$CACHE/llama-server"
JOBS="${LLAMA_BUILD_JOBS:-$(nproc)}"

if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi

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

PY="${PYTHON:-python3}"
WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "build-llama-server: fetching llama-cpp-python==$VERSION (sdist) into $WORK" >&2
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

# No network at build time (no prebuilt web UI, no curl/https); only the server target is built.
echo "build-llama-server: building llama-server with $JOBS jobs (about 11 minutes on 2 cores)" >&2
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$WORK/build" --target llama-server -j "$JOBS" >&2
install -m 0755 "$WORK/build/bin/llama-server" "$BIN.tmp"
cp "$SRC/LICENSE" "$CACHE/LICENSE"
mv "$BIN.tmp" "$BIN"
echo "$BIN"
