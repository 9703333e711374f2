import gzip
import io
import json

from hypothesis import given, settings, strategies as st

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


_json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                            | st.text(max_size=8), lambda kids: st.lists(kids, max_size=3)
                            | st.dictionaries(st.text(max_size=4), kids, max_size=3), max_leaves=6)


@settings(max_examples=400, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["id", "prompt", "topic", "x", ""]), _json_values, max_size=4),
       prompt=st.none() | st.text(max_size=12) | st.integers(), rid=st.none() | st.text(max_size=6) | st.integers(-2**70, 2**70)
       | st.booleans() | st.floats(), pad=st.sampled_from(["", " ", "\r", "\t "]))
def test_the_one_call_read_of_a_usual_line_is_the_careful_read(fields, prompt, rid, pad):
    """parse_line reads a usual line with one orjson call (_plain_record); whatever that path takes, it
    must read as the careful json path does, and what it leaves (NaN, big ints, blank prompts, odd
    ids) the careful path reads with its reasons."""
    import infra.prompting.dataset as dataset

    obj = {**fields, **({"prompt": prompt} if prompt is not None else {}), **({"id": rid} if rid is not None else {})}
    raw = (pad + json.dumps(obj, ensure_ascii=bool(len(pad) % 2)) + pad + "\n").encode("utf-8", "surrogatepass")
    fast = parse_line(raw, 7, "jsonl", "prompt")
    original, dataset._plain_record = dataset._plain_record, lambda *a: None
    try:
        careful = parse_line(raw, 7, "jsonl", "prompt")
    finally:
        dataset._plain_record = original
    assert repr(fast) == repr(careful)  # repr: a NaN field equals itself there, not under ==
