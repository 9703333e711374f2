"""Reading a server's log file: its tail, and the first lines that look like an error. Used for
Slurm jobs' logs (infra/slurm/backend.py) and local servers' (infra/backends).
"""

from __future__ import annotations

import os
import re


def log_tail(path: str | os.PathLike[str], lines: int = 40, *, max_bytes: int = 256 * 1024) -> str:
    """The last `lines` lines of a log file, or "" if it does not exist (yet)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) if lines > 0 else ""


# The words a failing rank's first report carries: Python tracebacks and logging levels, srun's
# and slurmstepd's "error:", NeMo's and CUDA's "Error"/"FATAL".
_ERROR_LINE = re.compile(r"\b(error|exception|traceback|fatal)\b", re.IGNORECASE)


def first_error_lines(path: str | os.PathLike[str], limit: int = 6, *, max_bytes: int = 16 * 1024 * 1024) -> list[str]:
    """The first `limit` lines of a log that look like an error, from its first `max_bytes`.

    With 16 ranks writing to one log, the rank that failed first reports once and then the other
    fifteen log their shutdown: the cause is near the top, the tail is noise."""
    found: list[str] = []
    try:
        with open(path, "rb") as fh:
            for raw in fh.read(max_bytes).splitlines():
                line = raw.decode("utf-8", errors="replace").rstrip()
                if _ERROR_LINE.search(line):
                    found.append(line)
                    if len(found) >= limit:
                        break
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        pass
    return found
