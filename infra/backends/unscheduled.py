"""What local processes and attached servers share: no scheduled end (unlike a Slurm job's time limit)."""

from __future__ import annotations


class NoScheduledEnd:
    """Local processes and attached servers run until released."""

    _started_at: float | None = None

    def running_at(self) -> float | None:
        return self._started_at

    def ends_at(self) -> float | None:
        return None

    def scheduled_end(self) -> str | None:
        return None
