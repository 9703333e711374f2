"""Row ids and lineage across a pipeline's stages: pure functions, no I/O.

Today a row's key is (id, sample): the samples of one record share its id, so a second stage
reading those rows would see duplicate ids. A row a pipeline stage writes therefore gets an id of
its own, derived from the record it was generated from:

    {record_id}.{sample}/{stage}.{item}        t1.0/subtopics.2, then t1.0/subtopics.2.1/questions.4

(`item` is the split item, 0 for a stage that does not split.) It is unique (the record ids of a
stage are; the suffix differs per sample and item), stable across reruns (no counter, no clock,
no hash of the reply) and parses back: a stage name has no `.` or `/`, sample and item are digits,
so the last segment is found from the right whatever characters the input's own id holds. Given
the chain of stage names, `lineage_of` peels the segments one by one; a row also carries its
`lineage` (the ids of its ancestors, the input record first) so nobody has to parse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from infra.prompting.dataset import RESERVED_FIELDS

# No "." or "/": they delimit id segments. Lower case and short: a stage name is also a key component
# (`stages/{name}/`) and part of task names (infra/pipeline/model.py validates stages with it).
STAGE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")
# The fields a pipeline row owns: a parent's or an item's field of one of these names never
# overwrites it (output_record's rule, extended by the pipeline's own fields).
ROW_FIELDS = (*RESERVED_FIELDS, "lineage", "parent", "judge", "split")
# A parent's fields a child does not carry: its ids live in the child's id and lineage, and its
# prompt and generation metadata stay in the parent stage's own rows (reachable by lineage), so a
# row does not grow with every stage's prompt.
NOT_PASSED = ("id", "sample", "lineage", "prompt", "generation")
_SEGMENT = re.compile(r"(?s)(?P<parent>.*)\.(?P<sample>0|[1-9][0-9]*)/(?P<stage>[A-Za-z][A-Za-z0-9_-]{0,63})\.(?P<item>0|[1-9][0-9]*)")


@dataclass(frozen=True)
class ChildId:
    parent_id: str
    sample: int
    stage: str
    item: int


def check_stage_name(name: str) -> str:
    """The name, or ValueError saying what a stage name may hold (a pydantic validator's error)."""
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
        raise ValueError(f"stage name {name!r} must start with a letter and hold only lower-case letters, digits, '_' "
                         "and '-' (at most 40): it becomes part of row ids, task names and paths")
    return name


def child_id(parent_id: str, sample: int, stage: str, item: int = 0) -> str:
    """The id of the row `stage` generated from record `parent_id` (sample `sample`, split item `item`)."""
    if sample < 0 or item < 0:
        raise ValueError(f"sample {sample} and item {item} must be ≥ 0")
    return f"{parent_id}.{int(sample)}/{check_stage_name(stage)}.{int(item)}"


def parse_child_id(row_id: str, stage: str | None = None) -> ChildId | None:
    """The last segment of a derived id (of `stage`, when given), or None: not derived (an input id)."""
    m = _SEGMENT.fullmatch(row_id)
    if m is None or (stage is not None and m["stage"] != stage):
        return None
    return ChildId(m["parent"], int(m["sample"]), m["stage"], int(m["item"]))


def lineage_of(row_id: str, stages: Sequence[str]) -> list[str]:
    """The ids of a row's ancestors, the input record first, its parent last: `row_id` is a row of
    stages[-1], whose records came from stages[-2] ... from the input. Only the named stages are
    peeled, so an input id that itself looks derived ("a.0/b.1") is not mistaken for one."""
    chain, current = [], row_id
    for stage in reversed(stages):
        seg = parse_child_id(current, stage)
        if seg is None:
            raise ValueError(f"row id {row_id!r} was not derived through stages {list(stages)}: "
                             f"{current!r} has no '.<sample>/{stage}.<item>' suffix")
        current = seg.parent_id
        chain.append(current)
    return chain[::-1]


def child_lineage(record_lineage: Sequence[str], record_id: str) -> list[str]:
    """A generated row's lineage: its record's, then the record itself."""
    return [*record_lineage, record_id]


def child_fields(parent: Mapping, own: Mapping) -> dict:
    """The fields a child row inherits from its parent row, merged under its own `own` fields.

    A parent field passes under its name; where the child has a field of that name (one of `own`,
    or a row field such as `completion`), the parent's goes under `parent.<name>` instead: the
    row's `parent` object, so a template reads `{{ parent.completion }}`. NOT_PASSED fields stay
    behind. The parent's own `parent` object nests (`parent.parent.completion`)."""
    out: dict = {}
    moved: dict = {}
    for name, value in parent.items():
        if name in NOT_PASSED:
            continue
        if name in own or name in ROW_FIELDS:
            moved[name] = value
        else:
            out[name] = value
    out.update(own)
    if moved:
        out["parent"] = moved
    return out
