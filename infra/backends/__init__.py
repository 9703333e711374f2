"""Where the server runs: `local` (a child process group on this machine), `slurm` (a batch
job; see infra/slurm), or `attach` (a server someone else runs: no allocation, no teardown).

Every backend answers the same four questions: start it, where is it (`url`), is it still
alive (`dead_reason`), and release it (idempotent, safe from any exit path). A backend with a
scheduled end (a Slurm job's time limit) also says when it ends (`ends_at`) and whether it ended
by that schedule (`scheduled_end`): the pool then plans a successor instead of counting a failure.
"""

from __future__ import annotations

from typing import Protocol

from infra.backends.attach import AttachBackend
from infra.backends.local import LocalBackend
from infra.settings import Profile, Settings
from infra.slurm.backend import SlurmBackend

# The 1-token readiness probe's read timeout: a server that takes longer is probed again, and a
# probe on a hung server (an attached one re-checked after a loss) never holds the run's end long.
PROBE_TIMEOUT_S = 60.0


class Backend(Protocol):
    name: str
    job_ids: list[str]

    def start(self) -> None: ...
    def url(self) -> str | None: ...
    def dead_reason(self) -> str | None: ...
    def release(self) -> None: ...
    def ready_timeout(self) -> float: ...
    def status(self) -> str: ...
    def running_at(self) -> float | None: ...  # when it got its resources (epoch s): the queue wait ends
    def ends_at(self) -> float | None: ...  # when its allocation ends (epoch s); None: no end
    def scheduled_end(self) -> str | None: ...  # why it ended by schedule (time limit, preemption), if it did


def make_backend(settings: Settings, profile: Profile, *, run_id: str, flow_run_id: str | None = None,
                 replica: int = 0, url_index: int | None = None, reward_step=None) -> Backend:
    """`replica` is the launch number (a replacement gets a new port and directory); `url_index`
    the replica it stands for, which picks an attached server's URL (default: `replica`)."""
    if profile.backend == "local":
        return LocalBackend(settings, run_id, replica=replica)
    if profile.backend == "attach":
        return AttachBackend(settings, replica if url_index is None else url_index)
    return SlurmBackend(settings, profile, run_id=run_id, flow_run_id=flow_run_id, replica=replica,
                        reward_step=reward_step)  # a pipeline's reward server swapped into the job, or None
