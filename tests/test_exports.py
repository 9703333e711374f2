"""Trainer exports and the dataset card (infra/run/exports.py, infra/run/card.py): every JSONL and
Parquet file read by Hugging Face `datasets` with no format options (`load_dataset("json", ...)`,
`("parquet", ...)`), the same rows in the same order in both, fixed row groups, the run folder
itself loadable through the card's `configs`, and the NeMo-Aligner and TRL schemas as their code and
docs read them (neither imports without NeMo / a GPU stack here)."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never the Hub
datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")

from infra.recipes.pairs import PairParams, make_pairs, pair_row  # noqa: E402
from infra.run.card import card_text, export_run, publish_dataset  # noqa: E402
from infra.run.exports import ROW_GROUP_ROWS  # noqa: E402
from infra.settings import Settings  # noqa: E402
from infra.storage import open_output_store  # noqa: E402


def rows(n: int, samples: int = 2) -> list[dict]:
    return [{"id": f"r{i}", "sample": s, "prompt": f"Question {i}?", "completion": f"Answer {i}.{s} é",
             "judge": {"score": float((i + s * 3) % 5)}, "generation": {"model": "m"}}
            for i in range(n) for s in range(samples)]


def make_run(tmp_path, kept: list[dict]):
    store = open_output_store(str(tmp_path / "out"), "r1", Settings().s3, tmp_path / "staging")
    store.write_bytes("kept-00000.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
    manifest = {"run_id": "r1", "model": "Nemotron-4-340B-Instruct", "config_hash": "abc", "input_uri": "in.jsonl",
                "profile": "local", "records_in": len(kept), "records_written": len(kept) + 3, "records_rejected": 0,
                "parts": [{"name": "part-00000.jsonl"}], "replicas": [{"gpu_hours": 1.25}],
                "curation": {"records_kept": len(kept), "filtered": {"judge_score": 3},
                             "kept_parts": [{"name": "kept-00000.jsonl"}],
                             "config": {"judge": {"template": "Rate {{ completion }}", "min_score": 3,
                                                  "template_sha256": "0123456789abcdef"}}}}
    store.write_bytes("manifest.json", json.dumps(manifest).encode())
    return store


def load(kind: str, path, tmp_path):
    return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))


def test_a_plain_runs_sft_exports_load_and_the_run_folder_is_a_dataset(tmp_path):
    kept = rows(1300)  # 2600 rows: three row groups
    store = make_run(tmp_path, kept)
    got = export_run(store, str(tmp_path / "out"), "r1", Settings(work_dir=str(tmp_path / "work")))
    run_dir = tmp_path / "out" / "r1"
    assert [e["config"] for e in got["exports"]] == ["sft", "sft_nemo_aligner"]
    for e in got["exports"]:
        jl, pa_ = run_dir / "data" / e["files"]["jsonl"]["name"], run_dir / "data" / e["files"]["parquet"]["name"]
        from_json, from_parquet = load("json", jl, tmp_path), load("parquet", pa_, tmp_path)
        assert from_json.to_list() == from_parquet.to_list() and len(from_json) == len(kept) == e["rows"]
        assert pq.ParquetFile(pa_).metadata.num_row_groups == -(-len(kept) // ROW_GROUP_ROWS)
        first = from_parquet[0]
        assert first["id"] == "r0.0"
    sft = load("parquet", run_dir / "data" / "sft.parquet", tmp_path)
    assert sft[3]["messages"] == [{"role": "user", "content": "Question 1?"}, {"role": "assistant", "content": "Answer 1.1 é"}]
    nemo = load("json", run_dir / "data" / "sft-nemo-aligner.jsonl", tmp_path)[0]
    # NeMo's GPTSFTChatDataset: system, conversations of {from, value}, mask, type (as NeMo-Aligner's _convert_messages)
    assert (nemo["system"], nemo["mask"], nemo["type"]) == ("", "User", "VALUE_TO_TEXT")
    assert nemo["conversations"] == [{"from": "User", "value": "Question 0?"}, {"from": "Assistant", "value": "Answer 0.0 é"}]
    # The folder itself: the card's configs, SFT the default; the manifest and parts are not read.
    whole = datasets.load_dataset(str(run_dir), split="train", cache_dir=str(tmp_path / "hf"))
    assert whole.to_list() == sft.to_list()
    card = (run_dir / "README.md").read_text()
    assert "Nemotron-4-340B-Instruct" in card and "judge_score 3" in card and "1.25" in card and "# license:" in card
    # the scorer: the judge is the generating model, named with its template's hash and its threshold
    assert ("## Scoring\n\n- rows judged by the generating model `Nemotron-4-340B-Instruct` (judge template sha256 "
            "`0123456789ab`, score `judge.score`, kept at score >= 3)") in card


def test_preference_exports_in_nemo_aligner_and_trl_schemas(tmp_path):
    params = PairParams(score="judge.score", min_margin=1)
    pairing = make_pairs(rows(40, samples=3), params)
    pairs = [pair_row(p, params) for p in pairing.pairs]
    assert len(pairs) > 10
    root = open_output_store(str(tmp_path / "out"), "p1", Settings().s3, tmp_path / "staging")
    data = open_output_store(str(tmp_path / "out" / "p1"), "data", Settings().s3, tmp_path / "staging")
    got = publish_dataset(root, data, "p1", rows(40, samples=3), pairs, {"models": ["gen"], "stages": []})
    run_dir = tmp_path / "out" / "p1"
    assert [e["config"] for e in got["exports"]] == ["sft", "sft_nemo_aligner", "dpo_nemo_aligner", "dpo_trl"]
    for e in got["exports"]:
        a = load("json", run_dir / "data" / e["files"]["jsonl"]["name"], tmp_path)
        b = load("parquet", run_dir / "data" / e["files"]["parquet"]["name"], tmp_path)
        assert a.to_list() == b.to_list() and len(a) == e["rows"]
    dpo = load("parquet", run_dir / "data" / "dpo-nemo-aligner.parquet", tmp_path)
    assert dpo.column_names == ["id", "prompt", "chosen_response", "rejected_response", "chosen_reward", "rejected_reward"]
    for row, pair in zip(dpo, pairs):
        # NeMo-Aligner DPOModelDataset with a string prompt: prompt + response is the text it tokenizes,
        # in the Nemotron chat template, each response ending the turn (its docs' and tests' shape).
        assert row["prompt"] == f"<extra_id_0>System\n\n<extra_id_1>User\n{pair['prompt']}\n<extra_id_1>Assistant\n"
        assert row["chosen_response"] == f"{pair['chosen']}\n<extra_id_1>" and row["rejected_response"].endswith("\n<extra_id_1>")
        assert row["chosen_reward"] - row["rejected_reward"] >= 1
    trl = load("json", run_dir / "data" / "dpo-trl.jsonl", tmp_path)
    # TRL's conversational preference type: prompt, chosen and rejected as lists of {role, content}.
    assert trl.column_names == ["id", "prompt", "chosen", "rejected"]
    assert trl[0]["prompt"] == [{"role": "user", "content": pairs[0]["prompt"]}]
    assert trl[0]["chosen"] == [{"role": "assistant", "content": pairs[0]["chosen"]}]
    assert trl[0]["rejected"] == [{"role": "assistant", "content": pairs[0]["rejected"]}]
    prefs = datasets.load_dataset(str(run_dir), "dpo_trl", split="train", cache_dir=str(tmp_path / "hf"))
    assert prefs.to_list() == trl.to_list()


def test_a_format_with_no_rows_has_no_file_and_none_left_from_before(tmp_path):
    root = open_output_store(str(tmp_path / "out"), "e1", Settings().s3, tmp_path / "staging")
    data = open_output_store(str(tmp_path / "out" / "e1"), "data", Settings().s3, tmp_path / "staging")
    params = PairParams(score="judge.score")
    before = publish_dataset(root, data, "e1", rows(3), [pair_row(p, params) for p in make_pairs(rows(3), params).pairs], {})
    assert all(e["files"] for e in before["exports"])
    got = publish_dataset(root, data, "e1", rows(3), [], {})  # a rerun whose margin leaves no pair
    assert sorted(p.name for p in (tmp_path / "out" / "e1" / "data").iterdir()) == [
        "sft-nemo-aligner.jsonl", "sft-nemo-aligner.parquet", "sft.jsonl", "sft.parquet"]
    assert [e["rows"] for e in got["exports"]] == [3 * 2, 3 * 2, 0, 0]
    card = card_text("e1", got["exports"], {})
    assert card.startswith("---\npretty_name:") and "dpo_trl" not in card.split("---")[1] and "(no rows, no file)" in card
    whole = datasets.load_dataset(str(tmp_path / "out" / "e1"), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(whole) == 6


@pytest.mark.integration
def test_a_plain_run_with_export_ends_with_trainer_files_and_a_card(prefect_server, workdir):
    import subprocess
    import sys

    from benchmarks.faults import local_env

    (workdir / "in.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say {i}"}) + "\n" for i in range(5)))
    env = {**os.environ, **local_env(workdir), **prefect_server.client_env(), "PREFECT_HOME": str(workdir / "prefect")}
    flags = ["run", "--run-id", "x1", "--input-uri", "in.jsonl", "--output-uri", str(workdir / "out"),
             "--samples-per-prompt", "2", "--tokens-to-generate", "6", "--export"]
    done = subprocess.run([sys.executable, "-m", "flows.cli", *flags], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = workdir / "out" / "x1"
    parts = [json.loads(line) for p in sorted(run_dir.glob("part-*.jsonl")) for line in p.read_text().splitlines()]
    sft = datasets.load_dataset(str(run_dir), split="train", cache_dir=str(workdir / "hf"))
    assert [r["messages"][1]["content"] for r in sft] == [r["completion"] for r in parts] and len(parts) == 10
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == [
        "sft-nemo-aligner.jsonl", "sft-nemo-aligner.parquet", "sft.jsonl", "sft.parquet"]
    assert "simulated" in (run_dir / "README.md").read_text()


def test_exports_and_card_on_s3_under_the_run_prefix(s3_settings, s3_client, s3_bucket, tmp_path):
    kept = rows(30)
    out = f"s3://{s3_bucket}/runs"
    store = open_output_store(out, "s1", s3_settings.s3, s3_settings.work_path("staging"))
    store.write_bytes("kept-00000.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
    store.write_bytes("manifest.json", json.dumps({"model": "m", "curation": {"kept_parts": [{"name": "kept-00000.jsonl"}]}}).encode())
    got = export_run(store, out, "s1", s3_settings)
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/s1/")["Contents"])
    assert {"runs/s1/README.md", "runs/s1/data/sft.parquet", "runs/s1/data/sft.jsonl",
            "runs/s1/data/sft-nemo-aligner.parquet"} <= set(keys)
    local = tmp_path / "sft.parquet"
    local.write_bytes(s3_client.get_object(Bucket=s3_bucket, Key="runs/s1/data/sft.parquet")["Body"].read())
    assert len(load("parquet", local, tmp_path)) == len(kept) == got["exports"][0]["rows"]


EXPORT_IN_A_FRESH_PROCESS = """
import json, sys
from infra.run.card import publish_dataset
from infra.settings import Settings
from infra.storage import open_output_store
out, rows, pairs = sys.argv[1], *(json.loads(open(a, encoding="utf-8").read()) for a in sys.argv[2:])
root = open_output_store(out, "p1", Settings().s3, out + "/staging")
data = open_output_store(out + "/p1", "data", Settings().s3, out + "/staging")
publish_dataset(root, data, "p1", rows, pairs, {"models": ["gen"], "stages": []})
print(json.dumps(sorted(m for m in ("pandas", "numpy") if m in sys.modules)))
"""


def test_parquet_rows_are_the_jsonl_rows_and_exporting_imports_no_pandas(tmp_path):
    """Each row group is parsed from its JSONL lines (Arrow's JSON reader): the same table as
    `Table.from_pylist` gives, over texts JSON escapes (quotes, control characters, newlines,
    astral and combining characters) and floats that must round-trip; and the orchestrator never imports
    pandas for it (from_pylist did: ~50 MB of its peak RSS, benchmarks/pipeline_rss.py)."""
    import subprocess
    import sys

    import pyarrow as pa

    from infra.run.exports import arrow_schema

    texts = ['say "hi"\n\tthen \\ go', "\x00\x01\x1f ctrl", "😀 e\u0301 ‮ \u2028 \ufeff", "", "x" * 5000]
    kept = [{"id": f"r{i}", "prompt": texts[i % 5] + str(i), "completion": texts[(i + 2) % 5]} for i in range(ROW_GROUP_ROWS + 7)]
    pairs = [{"id": f"p{i}", "prompt": texts[i % 5], "chosen": texts[(i + 1) % 5], "rejected": texts[(i + 3) % 5],
              "chosen_score": 0.1 + 0.2 * i, "rejected_score": -1e-300 if i % 2 else 1.7976931348623157e308}
             for i in range(30)]
    (tmp_path / "kept.json").write_text(json.dumps(kept), encoding="utf-8")
    (tmp_path / "pairs.json").write_text(json.dumps(pairs), encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", EXPORT_IN_A_FRESH_PROCESS, str(tmp_path / "out"), str(tmp_path / "kept.json"),
                           str(tmp_path / "pairs.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pandas" not in json.loads(done.stdout.splitlines()[-1])
    data = tmp_path / "out" / "p1" / "data"
    for config, stem in (("sft", "sft"), ("sft_nemo_aligner", "sft-nemo-aligner"), ("dpo_nemo_aligner", "dpo-nemo-aligner"),
                         ("dpo_trl", "dpo-trl")):
        lines = [json.loads(line) for line in (data / f"{stem}.jsonl").read_bytes().split(b"\n") if line]
        table = pq.read_table(data / f"{stem}.parquet")
        assert table.equals(pa.Table.from_pylist(lines, schema=arrow_schema(config))), config
        assert len(lines) == (len(pairs) if config.startswith("dpo") else len(kept))
