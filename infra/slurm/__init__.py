"""Slurm: submit, state, find, cancel and locate jobs through the one command runner."""

from infra.slurm.client import (
    ACTIVE_STATES,
    STATE_SOURCES,
    TERMINAL_STATES,
    UNKNOWN,
    JobState,
    JobSummary,
    SlurmClient,
    is_terminal,
    log_tail,
    normalize_state,
)

__all__ = [
    "ACTIVE_STATES",
    "STATE_SOURCES",
    "TERMINAL_STATES",
    "UNKNOWN",
    "JobState",
    "JobSummary",
    "SlurmClient",
    "is_terminal",
    "log_tail",
    "normalize_state",
]
