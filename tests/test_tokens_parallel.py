"""Word-by-word counting shared with forked worker processes (infra/prompting/count_workers.py):
the same counts as counting here, and no process left behind."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import sentencepiece as spm

from infra.prompting import count_workers
from infra.prompting.tokens import SentencePieceFile
from tests.test_tokens import SENTENCE, TRICKY, nemotron_like, varied_strings, within_contract

pytestmark = pytest.mark.skipif(not count_workers.can_fork() or count_workers.usable_cores() < 2,
                                reason="worker processes need fork and more than one usable core")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = nemotron_like(tmp_path_factory.mktemp("parallel"), "p")
    return path, spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture
def small_batches_pay(monkeypatch):
    monkeypatch.setattr(count_workers, "PARALLEL_MIN_CHARS", 1000)  # the tests' batches are small


def crafted_texts(n=600, seed=5) -> list[str]:
    """Unicode, byte fallback (emoji, CJK the model never saw), runs of spaces, a literal "▁",
    combining accents, tabs and newlines: pieces of varied strings joined at random."""
    rng = random.Random(seed)
    parts = varied_strings(3000, seed=3, more=TRICKY) + [SENTENCE, SENTENCE.replace(" ", "   "), "\u2581" + SENTENCE,
                                                         "e\u0301t\u00e9 \U0001f642 \u65e5\u672c\u8a9e  \t\n x"]
    return ["".join(rng.choice(parts) for _ in range(rng.randint(1, 80))) for _ in range(n)]


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_workers_count_as_this_process_does_and_as_whole_encodes(model, small_batches_pay):
    path, sp = model
    texts = crafted_texts()
    exact = [len(ids) for ids in sp.encode(texts)]
    shared, here = SentencePieceFile(path), SentencePieceFile(path)
    here._words._workers = False  # the serial path, as before the workers
    before = children()
    try:
        # Every count exact (cap -1): the same numbers from both, and sentencepiece's own.
        assert shared.count_within(texts, -1) == here.count_within(texts, -1) == exact
        assert len(shared._words._workers.pids()) == count_workers.usable_cores() - 1 >= 1
        assert set(shared._words._workers.pids()) <= children() - before  # they ran in other processes
        # Caps at and around the counts: the same verdict (fits or not) for every text, the same count
        # wherever it does not fit, and at or below the cap a bound that holds.
        for cap in (40, 200, 600, 2000):
            a, b = shared.count_within(texts, cap), here.count_within(texts, cap)
            assert [n > cap for n in a] == [n > cap for n in b] == [e > cap for e in exact]
            assert all(within_contract(g, e, cap) for g, e in zip(a, exact))
        for cap_of in (lambda e: e, lambda e: e - 1):  # a cap per text, in batches: the edges
            caps = [cap_of(e) for e in exact]
            for cap in sorted(set(caps))[::37]:
                batch = [t for t, c in zip(texts, caps) if c == cap] * 40  # enough text to be shared
                got = shared.count_within(batch, cap)
                assert all(within_contract(g, len(sp.encode(t)), cap) for g, t in zip(got, batch))
        pool = shared._words._workers.pids()
    finally:
        shared.close()
    assert all(map(gone, pool))  # closed with the counter: none of its workers left
    assert shared.count_within(texts, -1) == exact and shared._words._workers is False  # after close: counted here


def test_a_batch_begun_is_counted_by_the_workers_while_the_caller_reads_on(model, small_batches_pay):
    """The plan begins a chunk's count before it reads the next: the workers count the whole batch
    meanwhile, and the caller, asking after that, counts nothing itself. Asked at once, it takes
    back pieces from the tail; either way every piece is counted once, exactly."""
    path, sp = model
    counter = SentencePieceFile(path)
    texts = crafted_texts(400, seed=11)
    exact = [len(ids) for ids in sp.encode(texts)]
    try:
        assert counter.count_within(texts[:50], -1) == exact[:50]  # the pool started
        workers = counter._words._workers
        begun = workers.begin(texts, -1)
        deadline = time.monotonic() + 120
        while not all(f.done() for f in begun._futures) and time.monotonic() < deadline:
            time.sleep(0.05)  # the caller elsewhere (the plan: reading and parsing its next chunk)
        here = []
        assert begun.result(lambda share, cap: here.append(share) or [len(ids) for ids in sp.encode(share)]) == exact
        assert here == []  # every piece was the workers'
        begun = workers.begin(texts, -1)
        assert begun.result(lambda share, cap: here.append(share) or counter._words._within(share, cap)) == exact
        assert len(begun._ranges) >= 4  # pieces to share (which process takes which: a race, each exact)
        assert counter.count_within_begun(texts, -1)() == exact and counter._words._workers is workers
    finally:
        counter.close()


def test_a_small_batch_or_one_core_is_counted_here(model):
    path, sp = model
    counter = SentencePieceFile(path)
    texts = crafted_texts(50)
    assert sum(map(len, texts)) < count_workers.PARALLEL_MIN_CHARS
    assert counter.count_within(texts, -1) == [len(ids) for ids in sp.encode(texts)]
    assert counter._words._workers is None  # no pool started for a batch that does not pay for it
    counter.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_lost_worker_is_dropped_and_the_batch_counted_here(model, small_batches_pay, monkeypatch, sig):
    """Killed: the pool breaks. Stopped (alive, never answering, as a worker deadlocked at fork would
    be): its share's deadline passes, and it is killed. Either way the batch is counted here, exactly."""
    path, sp = model
    counter = SentencePieceFile(path)
    texts = crafted_texts(300, seed=9)
    exact = [len(ids) for ids in sp.encode(texts)]
    try:
        assert counter.count_within(texts, -1) == exact
        pids = counter._words._workers.pids()
        for pid in pids:
            os.kill(pid, sig)
        monkeypatch.setattr(count_workers, "SHARE_DEADLINE_S", 1.0)
        assert counter.count_within(texts, -1) == exact
        assert counter._words._workers is False
        deadline = time.monotonic() + 10
        while not all(map(gone, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Only the pool's own: the test process has other children (session fixtures' servers).
        assert all(map(gone, pids)), "a lost worker was left running"
    finally:
        counter.close()


PROGRAM = """
import json, os, signal, sys, time
import psutil
# A Ctrl-C as a terminal delivers it: a process started in the background by a shell (make test under
# nohup, CI) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
from infra.prompting import count_workers
from infra.prompting.tokens import token_counter
count_workers.PARALLEL_MIN_CHARS = 1000
counter = token_counter(sys.argv[1])
counter.count_within([sys.argv[2]] * 200, -1)
print(json.dumps(counter._words._workers.pids()), flush=True)
if sys.argv[3] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[3] == "ctrl-c":
    try:
        os.killpg(0, signal.SIGINT)  # a Ctrl-C reaches the whole process group
        time.sleep(5)
    except KeyboardInterrupt:
        time.sleep(1)  # time for a worker that took it to fall over
        print(json.dumps([psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in counter._words._workers.pids()]))
"""  # "exit": leaves without closing the (cached) counter, as a flow run's process does


@pytest.mark.parametrize("how", ["exit", "kill", "ctrl-c"])
def test_no_worker_outlives_its_process(model, how):
    path, _ = model
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(path), SENTENCE * 3, how], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()}, start_new_session=True)
    assert proc.returncode == (-signal.SIGKILL if how == "kill" else 0), proc.stderr
    pids, *alive = map(json.loads, proc.stdout.splitlines())
    assert pids
    if how == "ctrl-c":  # a worker ignores Ctrl-C (the parent stops it): no traceback of its own
        assert alive == [[True] * len(pids)] and "Traceback" not in proc.stderr, proc.stderr
    deadline = time.monotonic() + 10 * count_workers.PARENT_POLL_S + 10  # a wait, with a deadline
    while not all(map(gone, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(map(gone, pids)), [p for p in pids if not gone(p)]


def test_a_flow_counts_with_workers_as_without_and_leaves_none(prefect_harness, workdir, monkeypatch, model,
                                                              small_batches_pay):
    """The real generate flow (in this process, as a Prefect worker runs it), its plan and generation
    pass counting through the cached counter's workers; then again with them closed."""
    from flows.generate import generate
    from infra.prompting.tokens import token_counter

    path, _ = model
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_MODEL__TOKENIZER", str(path))
    monkeypatch.setenv("NSDG_MODEL__CONTEXT_LENGTH", "300")
    rng = random.Random(3)
    with open(workdir / "in.jsonl", "w") as f:  # short, word-counted and overlong prompts, mixed
        for i in range(60):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"record {i}: " + SENTENCE * rng.choice([1, 4, 8, 30])}) + "\n")
    counter = token_counter(str(path))
    before = children()

    def run(run_id):
        generate(input_uri=str(workdir / "in.jsonl"), output_uri=str(workdir / "out"), run_id=run_id,
                 sampling={"tokens_to_generate": 8}, shard_size=20, on_bad_input="skip")
        out = workdir / "out" / run_id
        kept = [json.loads(x)["id"] for p in sorted(out.glob("part-*.jsonl")) if not p.name.endswith("rejects.jsonl")
                for x in p.read_text().splitlines()]
        rejected = [json.loads(x)["line"] for x in (out / "input-rejects.jsonl").read_text().splitlines()]
        return kept, rejected

    try:
        with_workers = run("with-workers")
        assert counter._words._workers and counter._words._workers.pids()  # the flow's counts went through them
    finally:
        counter.close()
    assert not [p for p in children() - before if not gone(p)]  # closed with the counter
    without = run("without-workers")
    assert with_workers == without and with_workers[0] and with_workers[1]  # some kept, some overlong
