"""Smoke-runs a llama-server binary: start it on a free loopback port, wait for /health, ask for a
1-token completion, stop it. Exit 0 when all of that worked; otherwise one line on stderr naming the
step that failed and what was seen (the exit signal, the last lines of its log).

Used by tools/build-llama-server.sh before a build is cached (issue 22: a -march=native build crashed
with a general protection fault on another CPU). Standard library only: it runs before and outside
the project's venv.

    python tools/smoke_llama_server.py BINARY GGUF
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

READY_S = 60.0
COMPLETION_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited {code}"


def main(binary: str, gguf: str) -> int:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen([binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--ctx-size", "256",
                                 "--threads", "1", "--parallel", "1"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

        def fail(step: str) -> int:
            log.seek(0)
            tail = " | ".join(log.read().strip().splitlines()[-3:])
            seen = describe_exit(proc.returncode) if proc.poll() is not None else "still running"
            print(f"smoke: {binary} failed at {step} ({seen}); last log lines: {tail}", file=sys.stderr)
            return 1

        try:
            deadline = time.monotonic() + READY_S
            while True:
                if proc.poll() is not None:
                    return fail("start")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                        if reply.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    return fail(f"/health within {READY_S:.0f} s")
                time.sleep(0.2)
            body = json.dumps({"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}).encode()
            request = urllib.request.Request(url + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=COMPLETION_S) as reply:
                    text = json.load(reply)["choices"][0]["text"]
            except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, IndexError, ValueError) as exc:
                return fail(f"a 1-token completion ({exc})")
            print(f"smoke: {os.path.basename(binary)} served /health and completed 1 token ({text!r})", file=sys.stderr)
            return 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
