"""Moving a run directory's objects to another (a pipeline stage moved aside to `superseded/` and
back, infra/pipeline/invalidate.py): the bytes arrive intact and are never read whole by the
orchestrator. Locally a rename (or, across file systems, a streamed copy); on S3 (moto over HTTP)
a copy made by S3 itself, one CopyObject or a multipart copy.

The move runs in a child process (this module run as a script) that reports how much its peak RSS
(VmHWM) grew: moto's server runs in the test's own process and holds the object in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MIB = 1 << 20
SIZE = 48 * MIB  # above the threshold below: the S3 move is a multipart copy, in 6 parts


def big(size: int = SIZE) -> bytes:
    block = hashlib.sha256(b"block").digest() * (MIB // 32)
    return b"".join(bytes([i % 251]) + block[1:] for i in range(size // MIB))


def move_in_child(source: tuple[str, str], target: tuple[str, str], *s3: str) -> dict:
    """move_objects(source store, target store) in a child; its report (names, hwm_growth)."""
    out = subprocess.run([sys.executable, "-m", "tests.test_storage_move", *source, *target, *s3],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def local_case(tmp_path: Path, source_root: Path) -> None:
    from infra.storage import open_output_store
    from infra.settings import Settings

    settings = Settings(work_dir=str(tmp_path / "work"))
    data = big()
    (source_root / "stages" / "facts").mkdir(parents=True)
    (source_root / "stages" / "facts" / "rows.jsonl").write_bytes(data)
    (source_root / "stages" / "facts" / "run.json").write_bytes(b'{"config_hash": "c1"}')
    inode = os.stat(source_root / "stages" / "facts" / "rows.jsonl").st_ino
    report = move_in_child((str(source_root / "stages"), "facts"), (str(tmp_path / "superseded"), "facts-g1"))
    assert report["names"] == ["rows.jsonl", "run.json"]  # run.json last
    target = open_output_store(str(tmp_path / "superseded"), "facts-g1", settings.s3, settings.work_path("staging"))
    source = open_output_store(str(source_root / "stages"), "facts", settings.s3, settings.work_path("staging"))
    assert target.list_names() == ["rows.jsonl", "run.json"] and source.list_names() == []
    assert target.sha256("rows.jsonl") == hashlib.sha256(data).hexdigest()
    assert report["hwm_growth"] < SIZE // 4, report  # never held whole (reading it would grow it by 48 MiB)
    return os.stat(tmp_path / "superseded" / "facts-g1" / "rows.jsonl").st_ino == inode


def test_a_large_local_object_moves_by_rename_with_its_bytes(tmp_path):
    assert local_case(tmp_path, tmp_path / "run") is True  # the same inode: renamed, not copied


def test_a_large_local_object_moves_across_file_systems_streamed(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system at /dev/shm")
    root = shm / f"nsdg-move-{os.getpid()}-{tmp_path.name}"
    try:
        assert local_case(tmp_path, root) is False  # another file system: a copy, streamed
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


@pytest.mark.s3
def test_a_large_s3_object_is_moved_by_s3_itself_with_its_bytes_and_sha(s3_settings, s3_bucket, s3_client):
    from infra.storage import open_output_store

    data = big()
    source = open_output_store(f"s3://{s3_bucket}/runs/p1/stages", "facts", s3_settings.s3, s3_settings.work_path("staging"))
    source.write_bytes("run.json", b'{"config_hash": "c1"}')
    sha = hashlib.sha256(data).hexdigest()
    s3_client.put_object(Bucket=s3_bucket, Key="runs/p1/stages/facts/rows.jsonl", Body=data, Metadata={"sha256": sha})
    report = move_in_child((f"s3://{s3_bucket}/runs/p1/stages", "facts"), (f"s3://{s3_bucket}/runs/p1/superseded", "facts-g1"),
                           s3_settings.s3.endpoint_url, "8")
    assert report["names"] == ["rows.jsonl", "run.json"]
    target = open_output_store(f"s3://{s3_bucket}/runs/p1/superseded", "facts-g1", s3_settings.s3, s3_settings.work_path("staging"))
    assert target.list_names() == ["rows.jsonl", "run.json"] and source.list_names() == []
    assert target.read_bytes("rows.jsonl") == data and target.sha256("rows.jsonl") == sha  # metadata kept
    head = s3_client.head_object(Bucket=s3_bucket, Key="runs/p1/superseded/facts-g1/rows.jsonl", ChecksumMode="ENABLED")
    assert head["ContentLength"] == SIZE and head.get("PartsCount", 6) == 6  # a multipart copy, 8 MiB parts
    assert report["hwm_growth"] < SIZE // 4, report  # the bytes never came through the mover
    assert target.move_in(source, "rows.jsonl") is False  # gone from the source: nothing to move


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(src_uri: str, src_id: str, dst_uri: str, dst_id: str, *s3: str) -> None:
    from infra.pipeline.invalidate import move_objects
    from infra.settings import Settings
    from infra.storage import open_output_store

    settings = Settings(s3={"endpoint_url": s3[0], "addressing_style": "path", "multipart_threshold_mb": int(s3[1])}
                        if s3 else {}, work_dir=str(Path(dst_uri.removeprefix("s3:/")).parent / "move-work")
                        if not s3 else "/tmp")

    def store(uri: str, run_id: str):
        return open_output_store(uri, run_id, settings.s3, settings.work_path("staging"))

    # Warm the clients, their pools and threads with a move between two other directories, of an
    # object of 4 parts plus one (a multipart copy on S3, with every one of its 4 threads busy).
    warm_src, warm_dst = store(src_uri, f"{src_id}-warm"), store(dst_uri, f"{dst_id}-warm")
    warm_src.write_bytes("warm.json", b"w" * ((4 * int(s3[1]) + 1) * MIB if s3 else 1))
    move_objects(warm_src, warm_dst)
    warm_dst.delete("warm.json")
    before = _hwm()
    names = move_objects(store(src_uri, src_id), store(dst_uri, dst_id))
    print(json.dumps({"names": names, "hwm_growth": _hwm() - before, "hwm": _hwm()}))


if __name__ == "__main__":
    _child(*sys.argv[1:])
