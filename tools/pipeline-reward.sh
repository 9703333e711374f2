#!/usr/bin/env bash
# `make pipeline-reward`: the worked example with a reward stage (examples/pipeline/pipeline-reward.yaml)
# on the local real model, with the PyTriton stand-in the reward tests use (tests/reward_standin.py: a
# real Triton server, NeMo-Aligner's reward_model contract, scores from a hash) as its reward server on
# 127.0.0.1:18424 (the url in the file). Starts the stand-in, waits for its model (120 s at most), runs
# the pipeline, and stops the stand-in's process group on every exit path. Its logs and the sentences
# it scored are kept in $OUT/$RUN_ID-reward-server/.
set -euo pipefail

PY="${PY:-.venv/bin/python}"
NSDG="${NSDG:-.venv/bin/nemotron-sdg}"
PORT="${REWARD_PORT:-18424}"  # examples/pipeline/pipeline-reward.yaml's servers.rm.url
FILE="${PIPELINE_FILE:-examples/pipeline/pipeline-reward.yaml}"  # tests/test_pipeline_reward_example.py: a small one
OUT="${OUT:-output}"
RUN_ID="${RUN_ID:-pipeline-reward}"
HERE="$OUT/$RUN_ID-reward-server"

ready() { "$PY" -c "import requests, sys; sys.exit(0 if requests.get('http://127.0.0.1:$PORT/v2/models/reward_model/ready', timeout=2).status_code == 200 else 1)" 2>/dev/null; }

if ready; then
    echo "pipeline-reward: 127.0.0.1:$PORT already answers as a reward server: stop it (or whatever holds the port) and run again" >&2
    exit 2
fi
TRITON_PY="$(PYTHON="$PY" bash tools/build-pytriton-venv.sh | tail -n 1)"  # `make pytriton`: built once per machine
LIBDIR="$("$TRITON_PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
mkdir -p "$HERE"
# Its own process group (setsid): Triton's server and stub processes stop with it.
LD_LIBRARY_PATH="$LIBDIR" PYTHONPATH="" setsid "$TRITON_PY" tests/reward_standin.py "$PORT" "$HERE/scored.jsonl" \
    >"$HERE/triton.log" 2>&1 &
PID=$!
stop() {
    kill -TERM -- "-$PID" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$PID" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL -- "-$PID" 2>/dev/null || true
}
trap stop EXIT
for _ in $(seq 1 240); do
    ready && break
    kill -0 "$PID" 2>/dev/null || { echo "pipeline-reward: the PyTriton stand-in exited before its model was ready; see $HERE/triton.log" >&2; exit 1; }
    sleep 0.5
done
ready || { echo "pipeline-reward: the PyTriton stand-in was not ready within 120 s; see $HERE/triton.log" >&2; exit 1; }
# In the background and waited for, so a TERM or INT to this script is passed on to the run (which
# releases its server) at once, as TERM (a background job here ignores INT), then the stand-in is
# stopped by the EXIT trap.
"$NSDG" run --pipeline "$FILE" --output-uri "$OUT" --run-id "$RUN_ID" &
RUN=$!
trap 'kill -TERM "$RUN" 2>/dev/null; wait "$RUN"; exit 143' TERM
trap 'kill -TERM "$RUN" 2>/dev/null; wait "$RUN"; exit 130' INT
wait "$RUN"
