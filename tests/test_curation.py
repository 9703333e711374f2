"""The curation stage on crafted parts in a real local output store: each filter's reason and
measured value, the judge's score read from its reply, exact and near dedup across shards
(first in input order kept), and a pass resumed after a kill keeping what one pass keeps."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from infra.errors import ConfigError, StorageError
from infra.run.manifest import PartInfo
from infra.recipes.curate import Curation, OpenCuration, curate
from infra.run.layout import FILTERED, filtered_name, kept_name, verdict_name
from infra.recipes.filters import repeated_ngram_share
from infra.recipes.judge import Judge, publish_judgement
from infra.recipes.params import FilterParams, JudgeParams
from infra.recipes.templates import PromptTemplate
from infra.prompting.sampling import SamplingParams
from infra.storage.jsonl import publish
from infra.storage.local import LocalOutputStore

CHASH = "gen0123456789abc"
LONG = "the river bends past the old mill where the miller keeps his grain dry through the long wet winter months"


def row(rid: str, completion: str, tokens: int = 10, finish: str = "end_string", sample: int = 0) -> dict:
    return {"id": rid, "sample": sample, "prompt": "p", "completion": completion,
            "generation": {"finish_reason": finish, "generated_tokens": tokens}}


def write_parts(store, shards: list[list[dict]], replies: list[list[str | None]] | None = None,
                judged_by: Judge | None = None) -> list[PartInfo]:
    """Published parts; with `replies`, each part's judgement by `judged_by` (a reply None: a failed one)."""
    parts = []
    for i, rows in enumerate(shards):
        name = f"part-{i:05d}.jsonl"
        sha, count, size = publish(store, name, rows)
        parts.append(PartInfo(name, i, count, sha, size, CHASH, 1, 1))
        if replies is not None:
            publish_judgement(store, judged_by, parts[-1], [
                {"id": r["id"], "sample": r["sample"], **({"reply": t} if t is not None
                                                          else {"error": "server rejected the judge prompt: too long"})}
                for r, t in zip(rows, replies[i])])
    return parts


def lines(store, name: str) -> list[dict]:
    return [json.loads(x) for x in (store.read_bytes(name) or b"").splitlines()]


def kept_ids(store, parts) -> list[str]:
    return [f"{r['id']}#{r['sample']}" for p in parts for r in lines(store, kept_name(p.name))]


def judge(params: JudgeParams) -> Judge:
    return Judge(params, PromptTemplate("inline", params.template), SamplingParams(greedy=True, tokens_to_generate=4))


@pytest.fixture
def store(tmp_path):
    return LocalOutputStore(tmp_path / "run")


def test_each_filter_names_itself_and_records_what_it_measured(store):
    parts = write_parts(store, [[
        row("ok", "A fine answer about rivers."),
        row("cut", "cut off mid", finish="length"),
        row("short", "hi", tokens=1),
        row("long", "far too long", tokens=99),
        row("nomatch", "no capital letter here"),
        row("banned", "As an AI model I cannot"),
        row("loop", "Go go go go go go go go go go go go"),
    ]])
    filters = FilterParams(drop_truncated=True, min_completion_tokens=2, max_completion_tokens=50,
                           must_match=[r"[A-Z]"], must_not_match=[r"(?i)as an ai"], max_repeated_ngram_share=0.5)
    result = curate(store, parts, Curation(filters=filters), CHASH)
    assert kept_ids(store, parts) == ["ok#0"]
    dropped = {r["id"]: (r["filter"], r["value"], r["limit"]) for r in lines(store, FILTERED)}
    assert dropped == {
        "cut": ("truncated", "length", "finish_reason"),
        "short": ("min_completion_tokens", 1, 2),
        "long": ("max_completion_tokens", 99, 50),
        "nomatch": ("must_match", False, "[A-Z]"),
        "banned": ("must_not_match", "As an AI", "(?i)as an ai"),
        "loop": ("repeated_ngrams", repeated_ngram_share("go " * 12, 3), 0.5),
    }
    assert result.kept == 1 and result.filtered == {"truncated": 1, "min_completion_tokens": 1, "max_completion_tokens": 1,
                                                    "must_match": 1, "must_not_match": 1, "repeated_ngrams": 1}
    assert repeated_ngram_share("go " * 12, 3) == pytest.approx(0.9)
    assert repeated_ngram_share("one two three four", 3) == 0.0


def test_judge_scores_are_read_from_replies_and_unparsed_or_failed_ones_are_reasons_of_their_own(store):
    rows = [row("a", "x"), row("b", "y"), row("c", "z"), row("d", "w")]
    params = JudgeParams(template="Rate: {{ completion }}\nScore:", min_score=3)
    parts = write_parts(store, [rows], [[" 4 - good", " Score: 2", " excellent!", None]], judge(params))
    result = curate(store, parts, Curation(params, judge=judge(params)), CHASH)
    kept = lines(store, kept_name(parts[0].name))
    assert [(r["id"], r["judge"]) for r in kept] == [("a", {"score": 4.0, "reply": " 4 - good"})]
    assert result.filtered == {"judge_min_score": 1, "judge_unparsed": 1, "judge_failed": 1}
    dropped = {r["id"]: (r["filter"], r["value"]) for r in lines(store, FILTERED)}
    assert dropped["b"] == ("judge_min_score", 2.0) and dropped["c"] == ("judge_unparsed", " excellent!")
    assert dropped["d"][0] == "judge_failed" and "too long" in dropped["d"][1]
    # A new score pattern or threshold reads the same replies again: no judge needed.
    params2 = params.model_copy(update={"score_pattern": r"Score: (\d+)", "min_score": 1})
    again = curate(store, parts, Curation(params2, judge=judge(params2)), CHASH)
    assert [r["id"] for r in lines(store, kept_name(parts[0].name))] == ["b"]
    assert again.filtered == {"judge_unparsed": 2, "judge_failed": 1}


def test_exact_dedup_keeps_the_first_in_input_order_across_shards_and_ignores_case_and_spacing(store):
    parts = write_parts(store, [
        [row("a", "Paris is the capital."), row("b", "Lyon."), row("a", "paris  is the\tCAPITAL.", sample=1)],
        [row("c", "PARIS IS THE CAPITAL."), row("d", "lyon."), row("e", "Marseille.")],
    ])
    result = curate(store, parts, Curation(filters=FilterParams(dedup_exact=True)), CHASH)
    assert kept_ids(store, parts) == ["a#0", "b#0", "e#0"]
    assert {r["id"] + "#" + str(r["sample"]): r["value"] for r in lines(store, FILTERED)} == {
        "a#1": "a#0", "c#0": "a#0", "d#0": "b#0"}
    assert result.filtered == {"exact_duplicate": 3}


def test_near_dedup_drops_a_one_word_edit_and_keeps_distinct_text(store):
    parts = write_parts(store, [
        [row("a", LONG), row("b", "an entirely different sentence about mountains snow and goats climbing slowly upward")],
        [row("c", LONG.replace("winter", "autumn")), row("d", "a third unrelated text on ships sailing south to warmer seas today")],
    ])
    result = curate(store, parts, Curation(filters=FilterParams(dedup_near=True, near_threshold=0.7)), CHASH)
    assert kept_ids(store, parts) == ["a#0", "b#0", "d#0"]
    assert result.filtered == {"near_duplicate": 1}
    assert lines(store, FILTERED)[0]["value"] == "a#0"


def test_a_pass_resumed_after_a_kill_keeps_what_one_pass_keeps(store, tmp_path):
    shards = [[row(f"r{s}{i}", f"answer {(s * 3 + i) % 7}") for i in range(3)] for s in range(4)]
    filters = FilterParams(dedup_exact=True, dedup_near=True)
    parts = write_parts(store, shards)
    one_go = curate(store, parts, Curation(filters=filters), CHASH)
    expected = kept_ids(store, parts)
    # Killed after shard 1's verdict: shards 2 and 3 have none; shard 0's is current and not rewritten.
    for p in parts[2:]:
        (tmp_path / "run" / verdict_name(p.name)).unlink()
    before = (tmp_path / "run" / kept_name(parts[0].name)).stat().st_mtime_ns
    resumed = curate(store, parts, Curation(filters=filters), CHASH)
    assert kept_ids(store, parts) == expected and resumed.filtered == one_go.filtered and resumed.rewritten == 2
    assert (tmp_path / "run" / kept_name(parts[0].name)).stat().st_mtime_ns == before
    # A changed threshold is a new stage hash: every shard's verdict is redone.
    assert curate(store, parts, Curation(filters=FilterParams(dedup_exact=True)), CHASH).rewritten == 4


KEPT_PART = re.compile(r"kept-\d+\.jsonl")


def counted_reads(monkeypatch) -> Counter:
    """Every read of a file through a local store (its bytes, or its sha256, which hashes them), by name."""
    reads: Counter = Counter()
    for method in ("read_bytes", "sha256"):
        real = getattr(LocalOutputStore, method)

        def counted(self, name, real=real):
            reads[name] += 1
            return real(self, name)
        monkeypatch.setattr(LocalOutputStore, method, counted)
    return reads


def test_a_streamed_stage_keeps_its_dedup_tables_open_reading_each_part_once_and_a_restart_rebuilds_them_once(
        tmp_path, monkeypatch):
    shards = [[row(f"r{s}{i}", f"answer {(s * 3 + i) % 7}", sample=i % 2) for i in range(3)] for s in range(6)]
    curation = Curation(filters=FilterParams(dedup_exact=True, dedup_near=True))
    whole = LocalOutputStore(tmp_path / "whole")
    one_pass = curate(whole, write_parts(whole, shards), curation, CHASH)
    streamed = LocalOutputStore(tmp_path / "streamed")
    parts = write_parts(streamed, shards)
    reads = counted_reads(monkeypatch)
    # Fed as a streamed stage feeds it: the prefix of final shards, one more each time.
    with OpenCuration(streamed, curation, CHASH) as stage:
        for k in range(1, len(parts) + 1):
            stage.extend(parts[:k])
    kept_reads = {n: c for n, c in reads.items() if KEPT_PART.fullmatch(n)}
    assert not kept_reads and all(reads[p.name] == 1 for p in parts)  # each part read once, no kept part read back
    assert kept_ids(streamed, parts) == kept_ids(whole, parts) and one_pass.filtered == {"exact_duplicate": 11}
    # A restart after shard 3's verdict: a new stage seeds its tables once from kept 0-3, when shard 4 needs them.
    for p in parts[4:]:
        (tmp_path / "streamed" / verdict_name(p.name)).unlink()
    reads.clear()
    with OpenCuration(streamed, curation, CHASH) as stage:
        for k in range(1, len(parts) + 1):
            stage.extend(parts[:k])
        assert stage.rewritten == 2
    # each kept part of shards 0-3: hashed once (is its verdict current?), read once (seeding); none after
    assert {n: c for n, c in reads.items() if KEPT_PART.fullmatch(n)} == {kept_name(p.name): 2 for p in parts[:4]}
    assert kept_ids(streamed, parts) == kept_ids(whole, parts)


def test_a_streamed_stage_whose_write_failed_rebuilds_its_tables_and_keeps_what_one_pass_keeps(tmp_path, monkeypatch):
    shards = [[row(f"r{s}{i}", f"answer {(s * 3 + i) % 5}") for i in range(3)] for s in range(4)]
    curation = Curation(filters=FilterParams(dedup_exact=True))
    whole = LocalOutputStore(tmp_path / "whole")
    curate(whole, write_parts(whole, shards), curation, CHASH)
    streamed = LocalOutputStore(tmp_path / "streamed")
    parts = write_parts(streamed, shards)
    real, failed = LocalOutputStore.write_bytes, []

    def flaky(self, name, data):
        if name == verdict_name(parts[2].name) and not failed:  # shard 2's rows are in the tables, its verdict not written
            failed.append(name)
            raise StorageError("disk full")
        return real(self, name, data)
    monkeypatch.setattr(LocalOutputStore, "write_bytes", flaky)
    with OpenCuration(streamed, curation, CHASH) as stage:
        stage.extend(parts[:2])
        with pytest.raises(StorageError):
            stage.extend(parts[:3])
        stage.extend(parts)  # the retry: shard 2's rows are not duplicates of themselves
    assert failed and kept_ids(streamed, parts) == kept_ids(whole, parts)


def test_a_bad_regex_is_a_clear_parameter_error():
    with pytest.raises(ValueError, match=r"filters.must_not_match\[0\] '\(' is not a valid regex"):
        FilterParams(must_not_match=["("])
    with pytest.raises(ValueError, match="judge.score_pattern"):
        JudgeParams(template="x", score_pattern="[")


# Exponential backtracking: `re` needs seconds on this text (each 2 more letters triple it) and holds
# the GIL throughout; review 2 (D9) saw a 9-word completion hang curation and starve the lease heartbeat.
CATASTROPHIC = r"^(\w|\w\w)+$"
BACKTRACKS = "a" * 34 + "!"


@pytest.mark.parametrize("build", [lambda p: FilterParams(must_match=[p]), lambda p: FilterParams(must_not_match=["x", p]),
                                   lambda p: JudgeParams(template="x", score_pattern=p)])
def test_a_catastrophic_filter_or_judge_regex_is_refused_by_the_settings_check_before_any_gpu(build):
    """Probed on short texts built to make it backtrack (infra/recipes/patterns.py backtracks), as the
    output schema's patterns are: the run is refused before the allocation, not failed at curation."""
    with pytest.raises(ValueError, match=rf"{re.escape(repr(CATASTROPHIC))} searched .* backtracks catastrophically.*Rewrite it"):
        build(CATASTROPHIC)
    build(r"^\s*(\w+\s?)+[.?!]?$")  # nested repetition that `regex` matches without backtracking passes


def test_a_catastrophic_filter_regex_fails_curation_naming_it_instead_of_hanging(store):
    # Params built past the check (a pattern the probe misses meets the search's CPU-time bound instead).
    parts = write_parts(store, [[row("a", BACKTRACKS)]])
    with pytest.raises(ConfigError, match=rf"^filters.must_not_match\[1\] {re.escape(repr(CATASTROPHIC))} searched one text "
                                          r"of 35 characters for more than 1 s of CPU time: .* Rewrite it"):
        curate(store, parts, Curation(filters=FilterParams.model_construct(must_not_match=["x", CATASTROPHIC])), CHASH)
    params = JudgeParams.model_construct(template="Rate: {{ completion }}", score_pattern=CATASTROPHIC)
    scorer = judge(params)
    parts = write_parts(store, [[row("a", "fine")]], [[BACKTRACKS]], judged_by=scorer)
    with pytest.raises(ConfigError, match=r"^judge.score_pattern .* for more than 1 s"):
        curate(store, parts, Curation(params, judge=scorer), CHASH)


def test_the_flow_form_has_judge_and_filters_groups_with_every_field_described():
    from prefect.utilities.callables import parameter_schema

    from flows.generate import generate

    schema = parameter_schema(generate).model_dump_for_openapi()
    assert schema["properties"]["judge"]["description"].startswith("score each generated record")
    assert "filtered.jsonl" in schema["properties"]["filters"]["description"]
    for model in ("JudgeParams", "FilterParams"):
        fields = schema["definitions"][model]["properties"]
        assert fields and all(f.get("description") for f in fields.values()), (model, fields)


def test_a_judge_template_with_a_syntax_error_is_the_users_error_naming_judge_template():
    from infra.errors import ConfigError
    from infra.prompting.prompt_format import RAW
    from infra.recipes.judge import load_judge
    from infra.settings import Settings

    with pytest.raises(ConfigError, match=r"^judge.template \(inline\) line 1: .*Fix the template"):
        load_judge(JudgeParams(template="Rate {{ completion "), Settings(), RAW)


def test_the_stage_on_s3_over_http_writes_the_same_kept_and_filtered_parts(s3_settings, s3_bucket, store):
    from infra.storage import open_output_store

    s3 = open_output_store(f"s3://{s3_bucket}/out", "curate-s3", s3_settings.s3, s3_settings.work_path("staging"))
    shards = [[row("a", "Same text."), row("b", "same  TEXT.")], [row("c", "Other."), row("d", "short", tokens=1)]]
    filters = Curation(filters=FilterParams(dedup_exact=True, min_completion_tokens=2))
    on_s3, local = curate(s3, write_parts(s3, shards), filters, CHASH), curate(store, write_parts(store, shards), filters, CHASH)
    assert on_s3.as_manifest() == local.as_manifest() and on_s3.filtered == {"exact_duplicate": 1, "min_completion_tokens": 1}
    assert s3.read_bytes(FILTERED) == store.read_bytes(FILTERED)
    assert curate(s3, write_parts(s3, shards), filters, CHASH).rewritten == 0  # verdicts current on S3 too


# --- re-filter from the side file of what the filters read (infra/recipes/filter_inputs.py)


def _outputs(store, parts) -> dict[str, bytes]:
    names = [n for p in parts for n in (kept_name(p.name), f"filtered-{p.name.removeprefix('part-')}")] + [FILTERED]
    return {n: store.read_bytes(n) for n in names}


@pytest.mark.parametrize("first", [FilterParams(min_completion_tokens=1, dedup_exact=True),
                                   # the same patterns as the re-filter: their matches come from the side file
                                   FilterParams(min_completion_tokens=1, must_match=[r"\w"], must_not_match=["(?i)as an ai"],
                                                dedup_exact=True)], ids=["new-patterns", "same-patterns"])
def test_a_refilter_from_the_side_file_writes_what_a_full_pass_writes(store, tmp_path, first):
    from infra.run.layout import filter_inputs_name
    from infra.storage.local import LocalOutputStore

    shards = [[row(f"r{s}.{i}", text, tokens=t, finish=f)
               for i, (text, t, f) in enumerate([(LONG, 20, "end_string"), ("Ünïcode « quoted » text", 3, "length"),
                                                 ("short", 1, "end_string"), (LONG.upper(), 20, "end_string"),
                                                 ("as an AI I cannot", 5, "end_string")])] for s in range(3)]
    second = FilterParams(min_completion_tokens=2, must_match=[r"\w"], must_not_match=["(?i)as an ai"], max_repeated_ngram_share=0.5,
                          drop_truncated=True, dedup_exact=True)
    parts = write_parts(store, shards)
    curate(store, parts, Curation(filters=first), CHASH)
    assert all(store.read_bytes(filter_inputs_name(p.name)) for p in parts)  # written by the first pass
    fast = curate(store, parts, Curation(filters=second), CHASH)  # the re-filter: from the side files

    other = LocalOutputStore(tmp_path / "full")  # the same parts, no side file: the full path
    other_parts = write_parts(other, shards)
    full = curate(other, other_parts, Curation(filters=second), CHASH)
    assert (fast.kept, fast.filtered) == (full.kept, full.filtered) and fast.filtered
    assert _outputs(store, parts) == _outputs(other, other_parts)  # byte for byte, kept files included
    for p in parts:  # and a kept line is what dumping its row gives, as before the side file
        for line in store.read_bytes(kept_name(p.name)).splitlines():
            assert line.decode() == json.dumps(json.loads(line), ensure_ascii=False)


def test_a_refilter_with_the_same_patterns_reads_their_matches_from_the_side_file_and_searches_new_ones(store):
    """What each pattern of the pass that built the side file found is kept there (shown by editing one
    match); a pattern it was not built with is searched, in either list."""
    from infra.run.layout import filter_inputs_name

    parts = write_parts(store, [[row("a", LONG), row("b", "keep me"), row("c", "as an AI I cannot")]])
    built = FilterParams(must_match=[r"\w"], must_not_match=["(?i)as an ai"])
    curate(store, parts, Curation(filters=built), CHASH)
    assert kept_ids(store, parts) == ["a#0", "b#0"]
    name = filter_inputs_name(parts[0].name)
    side = json.loads(store.read_bytes(name))
    assert side["matches"] == {r"\w": ["t", "k", "a"], "(?i)as an ai": [None, None, "as an AI"]}
    side["matches"]["(?i)as an ai"][1] = "edited"
    store.write_bytes(name, json.dumps(side).encode())
    curate(store, parts, Curation(filters=FilterParams(must_match=[r"\w"], must_not_match=["(?i)as an ai"],
                                                       min_completion_tokens=2)), CHASH)
    assert kept_ids(store, parts) == ["a#0"]  # the edited match, read, not searched
    assert [(r["id"], r["filter"], r["value"]) for r in lines(store, filtered_name(parts[0].name))] == [
        ("b", "must_not_match", "edited"), ("c", "must_not_match", "as an AI")]
    curate(store, parts, Curation(filters=FilterParams(must_match=["(?i)as an ai"])), CHASH)
    assert kept_ids(store, parts) == ["b#0", "c#0"]  # the same pattern in the other list: its match (b's edited), read
    curate(store, parts, Curation(filters=FilterParams(must_not_match=["me$"])), CHASH)
    assert kept_ids(store, parts) == ["a#0", "c#0"]  # a new pattern: searched


def test_the_side_file_is_read_only_for_the_rows_it_names(store):
    """Its completions stand in for the part's where it names the part's sha256 (shown by editing one),
    and are ignored, then rewritten, where it names other rows."""
    from infra.run.layout import filter_inputs_name

    parts = write_parts(store, [[row("a", LONG), row("b", "keep me")]])
    curate(store, parts, Curation(filters=FilterParams(must_not_match=["forbidden"])), CHASH)
    name = filter_inputs_name(parts[0].name)
    side = json.loads(store.read_bytes(name))
    side["completion"][1] = "forbidden"
    store.write_bytes(name, json.dumps(side).encode())
    # Patterns the side file was not built with, so they search its completions.
    curate(store, parts, Curation(filters=FilterParams(must_not_match=["forbid", "nothing"])), CHASH)
    assert kept_ids(store, parts) == ["a#0"]  # read from the side file
    side["part_sha256"] = "0" * 64
    store.write_bytes(name, json.dumps(side).encode())
    curate(store, parts, Curation(filters=FilterParams(must_not_match=["forbidden"])), CHASH)
    assert kept_ids(store, parts) == ["a#0", "b#0"]  # a stale side file: the part itself was read
    assert json.loads(store.read_bytes(name))["part_sha256"] == parts[0].sha256
