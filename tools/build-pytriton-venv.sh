#!/usr/bin/env bash
# Builds, once per machine, the Python environment that runs NVIDIA's PyTriton (a real Triton
# Inference Server, CPU only here) for the reward-stage tests: tests/reward_standin.py serves a
# stand-in scoring function through it with NeMo-Aligner's model name, inputs and outputs.
#
# Its own venv, apart from the product's: nvidia-pytriton 0.7.0 requires numpy<2, and installing it
# into the product's venv downgrades numpy under pandas (which needs numpy>=2).
# Built from the same interpreter as the product's venv (PYTHON, its sys.base_prefix): Triton's
# Python backend stub links libpython3.X.so from the loader's path, so the tests start it with
# LD_LIBRARY_PATH at that interpreter's LIBDIR (else a distribution's libpython of another patch
# release meets this stdlib, and the model fails to load: `RLock has no _recursion_count`).
#     ${NSDG_TOOLS_CACHE:-$HOME/.cache/nemotron-sdg}/pytriton/<version>-py<X.Y>/bin/python
# Prints that path on its last line. Idempotent; safe from several clones at once (flock).
set -euo pipefail

VERSION="${PYTRITON_VERSION:-0.7.0}"
PY="${PYTHON:-python3}"
BASE="$("$PY" -c 'import sys; print(sys.base_prefix)')"
BASE_PY="$BASE/bin/python3"
XY="$("$BASE_PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
CACHE="${NSDG_TOOLS_CACHE:-$HOME/.cache/nemotron-sdg}/pytriton"
DEST="$CACHE/$VERSION-py$XY"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 900 9 || { echo "another build of $DEST held the lock past 15 min" >&2; exit 1; }
if [ ! -x "$DEST/bin/python" ] || [ ! -f "$DEST/.installed" ]; then
    rm -rf "$DEST"
    "$BASE_PY" -m venv "$DEST"
    "$DEST/bin/python" -m pip install -q "nvidia-pytriton==$VERSION" >&2
    touch "$DEST/.installed"
fi
echo "$DEST/bin/python"
