import gzip
import io
import json

from infra.prompting.dataset import BadLine, Record, derived_id, iter_input, iter_shards, parse_line, shard_count
from infra.run.layout import part_name


def lines(*objs) -> io.BytesIO:
    return io.BytesIO(b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objs))


def test_records_ids_and_passthrough():
    items = list(iter_input(lines({"id": "a", "prompt": "p1", "topic": "x"}, {"prompt": "p2"}), "jsonl", "prompt"))
    assert items[0] == Record("a", "p1", 1, {"topic": "x"}, given_id=True)
    assert items[1].id == derived_id(2, "p2") and items[1].line == 2


def test_ids_are_stable_across_reads():
    data = lines({"prompt": "same"}, {"prompt": "same"})
    first = [r.id for r in iter_input(data, "jsonl", "prompt")]
    data.seek(0)
    assert first == [r.id for r in iter_input(data, "jsonl", "prompt")]
    assert first[0] != first[1]  # the same prompt twice is two records


def test_bad_lines_have_reasons_and_line_numbers():
    raw = lines({"prompt": "ok"}, b"{not json", {"text": "x"}, {"prompt": ""}, {"prompt": 5}, b"[1]", b"\xff\xfe", b"")
    items = list(iter_input(raw, "jsonl", "prompt"))
    bad = [(i.line, i.reason.split(":")[0].split(" ")[0]) for i in items if isinstance(i, BadLine)]
    assert [b[0] for b in bad] == [2, 3, 4, 5, 6, 7]
    reasons = " | ".join(i.reason for i in items if isinstance(i, BadLine))
    for fragment in ("invalid JSON", "missing prompt field", "is empty", "not a string", "JSON object", "UTF-8"):
        assert fragment in reasons


def test_long_line_is_rejected_without_loading_it():
    raw = io.BytesIO(b'{"prompt": "' + b"x" * 5000 + b'"}\n{"prompt": "after"}\n')
    items = list(iter_input(raw, "jsonl", "prompt", max_line_bytes=1000))
    assert isinstance(items[0], BadLine) and "longer than 1000" in items[0].reason
    assert items[1].prompt == "after" and items[1].line == 2


def test_text_format_and_blank_lines():
    items = list(iter_input(io.BytesIO(b"one\n\n  \ntwo\r\n"), "text", "prompt"))
    assert [(r.prompt, r.line) for r in items] == [("one", 1), ("two", 4)]


def test_gzip_stream_reads_the_same():
    raw = gzip.compress(b'{"prompt": "a"}\n{"prompt": "b"}\n')
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as gz:
        assert [r.prompt for r in iter_input(io.BufferedReader(gz), "jsonl", "prompt")] == ["a", "b"]


def test_shards_fixed_size_and_skip():
    recs = [Record(str(i), f"p{i}", i + 1) for i in range(7)]
    shards = list(iter_shards(recs, 3))
    assert [(s.index, [r.id for r in s.records]) for s in shards] == [(0, ["0", "1", "2"]), (1, ["3", "4", "5"]), (2, ["6"])]
    assert [s.index for s in iter_shards(recs, 3, skip=frozenset({0, 2}))] == [1]
    assert shard_count(7, 3) == 3 and shard_count(6, 3) == 2
    assert part_name(12) == "part-00012.jsonl"


def test_parse_line_blank_is_none():
    assert parse_line(b"\n", 1, "jsonl", "prompt") is None
