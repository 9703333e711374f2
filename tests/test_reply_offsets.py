"""A reply row's offsets are read once and cut at the generation's start (infra/engines/nemo.py
_row_offsets): whatever the server sent, the cut holds exactly its ints at or after the start."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from infra.engines.nemo import _row_offsets

VALUES = st.one_of(st.integers(-5, 60), st.booleans(), st.floats(allow_nan=True), st.none(), st.text(max_size=2))


@given(row=st.one_of(st.lists(st.integers(0, 60)).map(sorted), st.lists(st.integers(0, 60)), st.lists(VALUES)),
       start=st.integers(-1, 61))
def test_the_cut_is_the_rows_ints_from_the_start_on(row, start):
    offsets, end = _row_offsets({"offsets": [row], "sentences": ["x" * 7]}, 0, start)
    assert offsets == [o for o in row if isinstance(o, int) and o >= start] and end == 7


def test_a_reply_without_offsets_has_none():
    assert _row_offsets({"sentences": ["a"]}, 0, 0) == (None, None)
    assert _row_offsets({"offsets": [[0, 1]], "sentences": [None]}, 0, 0) == ([0, 1], None)
