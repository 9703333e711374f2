"""The one periodic-thread helper (infra/system/periodic.py) behind the Slurm heartbeat, the lease
renewal and the parent watch: when it beats, what an error does, and how it stops."""

from __future__ import annotations

import logging
import threading

from infra.deadline import Deadline, poll_until
from infra.system.periodic import Periodic


def test_it_beats_until_stopped_and_stop_waits_for_the_thread():
    beats = []
    p = Periodic("t-beats", lambda: beats.append(1), 0.01, what="beat", immediately=True).start()
    poll_until(lambda: len(beats) >= 3 or None, deadline=Deadline(10), interval=0.01, what="three beats")
    p.stop()
    assert p.stopped and not p._thread.is_alive()  # joined: no beat after stop() returned


def test_a_beat_that_returns_false_ends_the_thread():
    beats = []

    def beat() -> bool:
        beats.append(1)
        return len(beats) < 2

    p = Periodic("t-false", beat, 0.01, what="beat", immediately=True).start()
    p._thread.join(timeout=10)
    assert not p._thread.is_alive() and len(beats) == 2


def test_without_immediately_the_first_beat_waits_one_interval():
    beats = []
    p = Periodic("t-later", lambda: beats.append(1), 3600, what="beat").start()
    p.stop()
    assert beats == []


def test_a_transient_error_is_logged_and_tried_again_any_other_ends_the_thread(caplog):
    caplog.set_level(logging.WARNING)
    log = logging.getLogger("tests.periodic")
    calls = []

    def beat() -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("disk hiccup")
        raise RuntimeError("a bug")

    p = Periodic("t-errors", beat, 0.01, what="could not beat", transient=(OSError,), immediately=True,
                 logger=log).start()
    p._thread.join(timeout=10)
    assert not p._thread.is_alive() and len(calls) == 3
    warnings = [r for r in caplog.records if r.name == "tests.periodic" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["could not beat: disk hiccup"] * 2
    errors = [r for r in caplog.records if r.name == "tests.periodic" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info and "t-errors stops" in errors[0].getMessage()


def test_stop_from_the_beat_itself_does_not_wait_for_its_own_thread():
    holder: list[Periodic] = []
    done = threading.Event()

    def beat() -> None:
        holder[0].stop()
        done.set()

    holder.append(Periodic("t-self", beat, 0.01, what="beat", immediately=True))
    holder[0].start()
    assert done.wait(10)
    holder[0]._thread.join(timeout=10)
    assert not holder[0]._thread.is_alive()
