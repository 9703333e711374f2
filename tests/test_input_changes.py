"""The generation pass reads the bytes the plan hashed, or stops: an input rewritten, appended to
or replaced during a run fails it with InputChanged before any record read after the change is
published, and a rerun finishes once the input is restored."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest

from infra.errors import ConfigError, InputChanged, InputError
from infra.planning import make_plan
from infra.settings import Settings
from infra.storage import open_input
from infra.storage.local import LocalOutputStore
from tests.test_planning import cfg


def write(path, tag: str, n: int, mode: str = "w") -> None:
    with open(path, mode) as f:  # "w" on an existing file: truncated and rewritten, same inode (`cmd > file`)
        for i in range(n):
            f.write(json.dumps({"id": f"{tag}{i:03d}", "prompt": f"Prompt {tag}{i:03d}: write one line about the sea, please."}) + "\n")


def published(run_dir) -> list[str]:
    return [json.loads(line)["id"] for p in sorted(run_dir.glob("part-*.jsonl")) for line in p.read_text().splitlines()]


@pytest.mark.parametrize("change", ["rewrite", "append", "replace"])
def test_the_plan_pin_refuses_a_changed_local_input(workdir, change):
    src = workdir / "in.jsonl"
    write(src, "a", 30)
    plan = make_plan(cfg(src), Settings(), LocalOutputStore(workdir / "out" / "r1"))
    assert plan.input_pin.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    if change == "rewrite":
        write(src, "b", 30)  # the same size
    elif change == "append":
        write(src, "c", 1, mode="a")
    else:
        write(workdir / "new.jsonl", "a", 30)  # the same bytes, another file
        os.replace(workdir / "new.jsonl", src)
    with pytest.raises(InputChanged) as exc, open_input(str(src), Settings().s3, pin=plan.input_pin):
        pass
    assert str(src) in str(exc.value) and "--new-run" in str(exc.value)
    with open_input(str(src), Settings().s3) as stream:  # unpinned, it opens as before
        assert stream.readline()


@pytest.mark.integration
@pytest.mark.parametrize("change", ["rewrite", "append"])
def test_a_run_whose_input_changes_publishes_nothing_from_the_change(prefect_harness, workdir, monkeypatch, change):
    from flows.generate import generate

    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_LOCAL__EXTRA_ARGS", json.dumps(["--extra-latency", "0.05"]))
    src, run_dir = workdir / "in.jsonl", workdir / "out" / "r"
    write(src, "a", 300)
    v1 = src.read_bytes()

    def change_input_mid_run() -> None:
        deadline = time.monotonic() + 120
        while not (run_dir / "part-00001.jsonl.state.json").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        write(src, "b", 300) if change == "rewrite" else write(src, "c", 40, mode="a")

    changer = threading.Thread(target=change_input_mid_run, daemon=True)
    changer.start()
    params = dict(input_uri=str(src), output_uri=str(workdir / "out"), run_id="r", shard_size=20, batch_size=10)
    with pytest.raises(InputChanged, match="changed while the run was reading it"):
        generate(**params)
    changer.join(timeout=10)
    ids = published(run_dir)
    assert ids and all(i.startswith("a") for i in ids) and len(set(ids)) == len(ids)  # nothing of the new input
    assert not (run_dir / "manifest.json").exists()

    src.write_bytes(v1)  # the advice: restore the input, rerun with the same run_id
    monkeypatch.delenv("NSDG_LOCAL__EXTRA_ARGS")
    generate(**params)
    assert published(run_dir) == [f"a{i:03d}" for i in range(300)]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["input_sha256"] == hashlib.sha256(v1).hexdigest() and manifest["records_written"] == 300


@pytest.mark.s3
def test_the_plan_pin_refuses_a_changed_s3_object(s3_settings, s3_bucket, s3_client, workdir):
    s3_client.put_object(Bucket=s3_bucket, Key="in.jsonl", Body=b'{"prompt": "one"}\n{"prompt": "two"}\n')
    uri = f"s3://{s3_bucket}/in.jsonl"
    plan = make_plan(cfg(uri), s3_settings, LocalOutputStore(workdir / "out" / "r1"))
    assert plan.input_pin.etag and plan.input_pin.version_id is None
    s3_client.put_object(Bucket=s3_bucket, Key="in.jsonl", Body=b'{"prompt": "uno"}\n{"prompt": "dos"}\n')
    with pytest.raises(InputChanged) as exc, open_input(uri, s3_settings.s3, pin=plan.input_pin):
        pass
    assert uri in str(exc.value) and "ETag" in str(exc.value)


@pytest.mark.s3
def test_a_versioned_s3_input_is_read_at_the_planned_version(s3_settings, s3_bucket, s3_client, workdir):
    s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    v1 = b'{"prompt": "one"}\n{"prompt": "two"}\n'
    s3_client.put_object(Bucket=s3_bucket, Key="in.jsonl", Body=v1)
    uri = f"s3://{s3_bucket}/in.jsonl"
    plan = make_plan(cfg(uri), s3_settings, LocalOutputStore(workdir / "out" / "r1"))
    assert plan.input_pin.version_id
    s3_client.put_object(Bucket=s3_bucket, Key="in.jsonl", Body=b'{"prompt": "overwritten"}\n')
    with open_input(uri, s3_settings.s3, pin=plan.input_pin) as stream:
        assert stream.read() == v1


@pytest.fixture
def scans(monkeypatch):
    """Counts the plan's full reads of its input; a file counts as settled 50 ms after its last change
    (the rule's 2 s would make every test wait)."""
    import infra.planning as planning
    from infra.run import input_scan

    monkeypatch.setattr(input_scan, "RACY_NS", 50_000_000)
    calls = []
    real = planning.scan_input
    monkeypatch.setattr(planning, "scan_input", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("change", ["rewrite", "append", "replace", "rewrite-touched-back", "none"])
def test_a_replan_of_the_same_input_reads_nothing_and_a_changed_input_is_read_again(workdir, scans, change):
    src, store = workdir / "in.jsonl", LocalOutputStore(workdir / "out" / "r1")
    write(src, "a", 30)
    time.sleep(0.1)  # settled
    first = make_plan(cfg(src), Settings(), store)
    again = make_plan(cfg(src), Settings(), store)
    assert len(scans) == 1  # the second plan took the first one's findings: the input was not read
    assert (again.records_in, again.config_hash, again.input_pin, again.duplicate_lines) == \
           (first.records_in, first.config_hash, first.input_pin, first.duplicate_lines)
    st = os.stat(src)
    if change == "rewrite":
        write(src, "b", 30)  # the same size, the same inode
    elif change == "append":
        write(src, "c", 1, mode="a")
    elif change == "replace":
        write(workdir / "new.jsonl", "a", 30)  # the same bytes, another file
        os.replace(workdir / "new.jsonl", src)
    elif change == "rewrite-touched-back":
        write(src, "b", 30)
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as they were; ctime cannot be set back
        assert (os.stat(src).st_size, os.stat(src).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    if change in ("rewrite", "append", "rewrite-touched-back"):  # other bytes: read, hashed, and refused
        with pytest.raises(ConfigError, match="input_sha256"):
            make_plan(cfg(src), Settings(), store)
    else:
        assert make_plan(cfg(src), Settings(), store).config_hash == first.config_hash
    assert len(scans) == (1 if change == "none" else 2)


def test_a_scan_is_reused_only_for_its_own_parameters_settled_input_and_rejects(workdir, scans, monkeypatch):
    from infra.run import input_scan

    src, store = workdir / "in.jsonl", LocalOutputStore(workdir / "out" / "r1")
    write(src, "a", 5)
    with open(src, "a") as f:
        f.write("{not json\n")
    time.sleep(0.1)
    first = make_plan(cfg(src, on_bad_input="skip"), Settings(), store)
    rejects = (store.root / "input-rejects.jsonl").read_bytes()
    assert make_plan(cfg(src, on_bad_input="skip"), Settings(), store).rejected == first.rejected == 1
    assert len(scans) == 1
    (store.root / "input-rejects.jsonl").write_bytes(b"")  # not the list the scan wrote: read again, and rewritten
    assert make_plan(cfg(src, on_bad_input="skip"), Settings(), store).rejected == 1 and len(scans) == 2
    assert (store.root / "input-rejects.jsonl").read_bytes() == rejects
    with pytest.raises(InputError, match="unusable"):  # another on_bad_input is another key: read, and refused
        make_plan(cfg(src), Settings(), store)
    assert len(scans) == 3
    monkeypatch.setattr(input_scan, "RACY_NS", 10**12)  # a file changed close to its scan is read again
    make_plan(cfg(src, on_bad_input="skip"), Settings(), store)
    assert len(scans) == 4


@pytest.mark.parametrize("versioned", [False, True])
def test_an_s3_input_is_not_read_again_while_its_etag_or_version_holds(s3_settings, s3_bucket, s3_client, workdir,
                                                                       scans, versioned):
    if versioned:
        s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    s3_client.put_object(Bucket=s3_bucket, Key="in.jsonl", Body=b'{"prompt": "one"}\n{"prompt": "two"}\n')
    uri, store = f"s3://{s3_bucket}/in.jsonl", LocalOutputStore(workdir / "out" / "r1")
    first = make_plan(cfg(uri), s3_settings, store)
    assert make_plan(cfg(uri), s3_settings, store).input_pin == first.input_pin and len(scans) == 1  # a HEAD, no GET
    s3_client.put_object(Bucket=s3_bucket, Key="in.jsonl", Body=b'{"prompt": "uno"}\n{"prompt": "dos"}\n')  # same size
    with pytest.raises(ConfigError, match="input_sha256"):
        make_plan(cfg(uri), s3_settings, store)
    assert len(scans) == 2
