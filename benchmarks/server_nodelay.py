"""The project's NeMo-compatible local server, started with TCP_NODELAY on its reply sockets.

    python benchmarks/server_nodelay.py serve-local --engine simulated ...   (same flags)

Why: the stock handler writes the reply headers and the body in two send() calls; with
Nagle's algorithm on, the body waits for the client's delayed ACK of the headers (~40 ms on
Linux), so every reply takes at least 40 ms however fast the engine is. That stall belongs to
the stand-in server, not to the orchestrator, and it caps a zero-cost benchmark near
1,000 records/s. benchmarks/run.py uses this launcher only while
`infra.local_server.handler.GenerateHandler.disable_nagle_algorithm` is not set, and says so
in results.md (see benchmarks/README in results.md, "server launcher").
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.local_server import handler  # noqa: E402
from infra.local_server.cli import main  # noqa: E402

handler.GenerateHandler.disable_nagle_algorithm = True

if __name__ == "__main__":
    raise SystemExit(main())
