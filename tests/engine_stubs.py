"""Stand-ins for Ray's CLI and `vllm serve`, put on the ranks' PATH so the vllm engine's rendered
launch runs as rendered: the Ray head and worker roles, the wait for every GPU, then the server.

- `ray start --head --node-ip-address=A --port=P --block` publishes A:P; `ray start --address=A:P
  --block` refuses an address that is not the head's; both register the node's GPUs (the task's
  CUDA_VISIBLE_DEVICES, else 8) and block until SIGTERM. `ray status --address=A:P` prints the
  cluster's GPU total the way Ray does (` 0.0/16.0 GPU`).
- `vllm serve MODEL ...` refuses to start unless the Ray cluster shows TP x PP GPUs when asked for
  the Ray backend, records its argv, then execs the project's local server on its --host/--port
  (`STUB_VLLM_EXTRA`: more serve-local flags, JSON).

State lives in `./ray-stub` (the job dir: every task starts there), or `$STUB_RAY_STATE`.
"""

from __future__ import annotations

import sys
from pathlib import Path

_COMMON = r"""#!PYTHON
import json, os, signal, sys, time
from pathlib import Path
STATE = Path(os.environ.get("STUB_RAY_STATE") or "ray-stub")
STATE.mkdir(exist_ok=True)
NODE = os.environ.get("SLURM_NODEID", "0")

def refuse(why, code=2):
    print(f"stub {Path(sys.argv[0]).name}: {why}", file=sys.stderr, flush=True)
    sys.exit(code)

def options(args):
    # --name=value and --name value, as argparse/click read them; bare flags map to "".
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            out[name] = value
        i += 1
    return out

def cluster_gpus():
    return sum(int(p.read_text()) for p in STATE.glob("node-*"))
"""

RAY = _COMMON + r"""
args = sys.argv[1:]
if args[:1] == ["status"]:
    head = STATE / "head"
    if not head.exists() or options(args[1:]).get("address") != head.read_text():
        refuse("ConnectionError: Could not find any running Ray instance at that address", 1)
    print(f"Resources\n---------\nUsage:\n 0.0/32.0 CPU\n 0.0/{cluster_gpus()}.0 GPU\n")
    sys.exit(0)
if args[:1] != ["start"]:
    refuse(f"only start and status are stubbed, not {args}")
opts = options(args[1:])
if "block" not in opts:
    refuse("start without --block: the launcher could not watch Ray's processes")
(STATE / f"argv-{NODE}").write_text(json.dumps(args))
if "head" in opts:
    (STATE / "head").write_text(f"{opts['node-ip-address']}:{opts['port']}")
elif not (STATE / "head").exists() or opts.get("address") != (STATE / "head").read_text():
    refuse(f"--address={opts.get('address')} is not the head's address")
visible = os.environ.get("CUDA_VISIBLE_DEVICES")
(STATE / f"node-{NODE}").write_text(str(len(visible.split(",")) if visible else 8))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(1)
"""

VLLM = _COMMON + r"""
args = sys.argv[1:]
if len(args) < 2 or args[0] != "serve":
    refuse(f"only `vllm serve MODEL` is stubbed, not {args}")
opts = options(args[2:])
(STATE / "vllm-argv").write_text(json.dumps(args))
(STATE / "vllm-env").write_text(json.dumps({k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "RAY_", "HF_", "XDG_"))}))
needed = int(opts.get("tensor-parallel-size", 1)) * int(opts.get("pipeline-parallel-size", 1))
if opts.get("distributed-executor-backend") == "ray" and cluster_gpus() < needed:
    refuse(f"the Ray cluster shows {cluster_gpus()} GPUs, fewer than TP x PP = {needed}", 3)
cmd = [sys.executable, "-m", "infra.local_server", "serve-local", "--engine", "simulated",
       "--host", opts["host"], "--port", opts["port"], "--served-model-name", opts.get("served-model-name", args[1]),
       *json.loads(os.environ.get("STUB_VLLM_EXTRA") or "[]")]
os.execvp(cmd[0], cmd)
"""


# `nvidia-smi -L` and `--query-gpu=driver_version` as the real one prints them, for the node
# launcher's preflight: one line per GPU of CUDA_VISIBLE_DEVICES (else 8).
NVIDIA_SMI = r"""#!PYTHON
import os, sys
gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7").split(",") if g]
if "-L" in sys.argv:
    for i, _ in enumerate(gpus):
        print(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-stub-{i:04d})")
elif any(a.startswith("--query-gpu=driver_version") for a in sys.argv):
    print("\n".join(os.environ.get("STUB_DRIVER_VERSION", "550.54.15") for _ in gpus))
else:
    sys.exit(f"stub nvidia-smi: {sys.argv[1:]} not supported")
"""


def write_hf_model(folder: Path) -> str:
    """A directory the vllm/trtllm preflight accepts: a Hugging Face checkpoint's config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "nemotron"}')
    return str(folder)


def write_engine_stubs(bin_dir: Path) -> Path:
    """Write `ray`, `vllm` and `nvidia-smi` into bin_dir (created) and return it."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("ray", RAY), ("vllm", VLLM), ("nvidia-smi", NVIDIA_SMI)):
        path = bin_dir / name
        path.write_text(text.replace("#!PYTHON", f"#!{sys.executable}", 1))
        path.chmod(0o755)
    return bin_dir
