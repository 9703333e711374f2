"""infra/storage/jsonl.py json_line: every JSONL line the product writes (parts, spills, exports) is
json.dumps(obj, ensure_ascii=False) + "\n" in UTF-8, byte for byte, whichever encoder makes it."""

import json
import math

import pytest

from infra.storage.jsonl import json_line

VALUES = [
    {"id": "r0", "sample": 0, "prompt": "Prompt 0", "completion": " déjà vu — 中文 🙂 \"quoted\" \\ \n\t\u0001",
     "generation": {"model": "m", "requested_model": None, "shard": 3, "input_line": 12, "finish_reason": "length",
                    "prompt_match": "exact", "generated_tokens": 64, "ok": True, "no": False}},
    {"results": [[0, {"prompt": "p", "completion": {"text": "t", "generated_from": 1}, "server_tokens": None}],
                 [31, {"prompt": "q", "completion": {"text": "\u2028\u2029", "generated_from": 0}}]]},
    {"floats": [0.1, -0.0, 1e300, 5e-324, 1.0, 123456789.125, math.inf, -math.inf, math.nan], "big": 2 ** 80},
    {1: "int key", 2.5: "float key", True: "bool key", None: "null key", "": []},
    [], {}, "a string alone", 3, 2.0, None, True,
]


@pytest.mark.parametrize("obj", VALUES)
def test_a_line_is_json_dumps_not_ascii_plus_a_newline(obj):
    assert json_line(obj) == (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def test_what_json_cannot_write_is_refused_as_json_dumps_refuses_it():
    with pytest.raises(TypeError, match="not JSON serializable"):
        json_line({"x": object()})
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate has no UTF-8
        json_line({"x": "\ud800"})


def test_threads_share_the_encoder():
    from concurrent.futures import ThreadPoolExecutor

    rows = [{"i": i, "text": "é" * (i % 50), "nested": {"k": [i, str(i)]}} for i in range(2000)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(json_line, rows))
    assert got == [(json.dumps(r, ensure_ascii=False) + "\n").encode() for r in rows]
