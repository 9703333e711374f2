"""A healthy flow that only waits, deployed by tests/test_prefect_server.py to run longer than the dead-run
automation's window (flows/zombies.py) under the heartbeat prefect.yaml gives every deployment."""

import time

from prefect import flow


@flow(name="healthy-sleeper")
def sleeper(seconds: float) -> float:
    time.sleep(seconds)  # alive all along: the flow engine's heartbeat thread keeps sending
    return seconds
