"""Files a trainer loads as they are, written under the run directory's `data/` (docs/outputs.md):

    sft.jsonl                  {"id", "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
                               (OpenAI / TRL conversational; TRL's SFTTrainer reads `messages`)
    sft-nemo-aligner.jsonl     {"id", "system", "conversations": [{"from": "User", "value"}, {"from": "Assistant",
                               "value"}], "mask": "User", "type": "VALUE_TO_TEXT"}: NeMo's GPTSFTChatDataset,
                               which NeMo-Aligner's SFT reads (its DPOModelDataset._convert_messages builds the same)
    dpo-nemo-aligner.jsonl     {"id", "prompt", "chosen_response", "rejected_response", "chosen_reward",
                               "rejected_reward"}: NeMo-Aligner's DPOModelDataset (DPO, and RPO with the rewards),
                               the prompt already in the Nemotron chat template and each response ending
                               with `<extra_id_1>`, as its docs and tests write them
    dpo-trl.jsonl              {"id", "prompt": [user message], "chosen": [assistant message], "rejected": [...]}:
                               TRL's conversational preference type
    *.parquet                  each of the above: the same rows in the same order, row groups of ROW_GROUP_ROWS

Every file has a fixed column schema (below), whatever its rows hold; a format with no rows has no
file (`datasets` refuses a Parquet file of no rows), and the card says so.
Pure conversions plus one writer, which streams: a run's kept rows are read a part at a time and
written a row group at a time, so the orchestrator's memory does not grow with the training set."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from infra.prompting.prompt_format import NEMOTRON_END, NEMOTRON_INSTRUCT
from infra.run.layout import TEMP_SUFFIX, temp_prefix
from infra.storage.jsonl import json_line, write_lines
from infra.storage.local import sha256_file

ROW_GROUP_ROWS = 1000  # rows per Parquet row group: small enough to stream, large enough to compress


class ExportParams(BaseModel):
    """What the trainer files take from a row (a pipeline's `exports`, docs/outputs.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_field: str = Field("prompt", pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$",
                            description="the row field that is the user's turn in the SFT and preference files: "
                                        "`prompt` (the text the model was sent) or a field the rows carry, such as "
                                        "a parent stage's `question`; a few-shot template's prompt holds its "
                                        "examples, which a chat model must not learn as the user's words")


class UserTurns:
    """Rows with `prompt` replaced by their `field` (a row without it keeps none, and is counted as
    not converted). Iterable again, as write_exports needs: it reads `rows` once per iteration."""

    def __init__(self, rows: Iterable[dict], field: str):
        self.rows, self.field = rows, field

    def __iter__(self) -> Iterator[dict]:
        for row in self.rows:
            yield {**row, "prompt": row.get(self.field)}


def pairs_with_user_turns(pairs: list[dict], users: dict[str, object]) -> list[dict]:
    """Pair rows whose `prompt` is the user's turn of their chosen row (`users`: row id -> that turn)."""
    return [{**p, "prompt": users.get(str(p.get("chosen_id")))} for p in pairs]


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def sft_messages(row: dict) -> dict | None:
    prompt, completion = _text(row.get("prompt")), _text(row.get("completion"))
    if prompt is None or completion is None:
        return None
    return {"id": str(row.get("id")) + (f".{row['sample']}" if "sample" in row else ""),
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


def sft_nemo_aligner(row: dict) -> dict | None:
    msg = sft_messages(row)
    if msg is None:
        return None
    user, assistant = msg["messages"]
    return {"id": msg["id"], "system": "", "mask": "User", "type": "VALUE_TO_TEXT",
            "conversations": [{"from": "User", "value": user["content"]},
                              {"from": "Assistant", "value": assistant["content"]}]}


def dpo_nemo_aligner(pair: dict) -> dict | None:
    if not all(isinstance(pair.get(k), str) for k in ("prompt", "chosen", "rejected")):
        return None
    return {"id": pair["id"], "prompt": NEMOTRON_INSTRUCT.format(system="", prompt=pair["prompt"]),
            "chosen_response": f"{pair['chosen']}\n{NEMOTRON_END}",
            "rejected_response": f"{pair['rejected']}\n{NEMOTRON_END}",
            "chosen_reward": float(pair["chosen_score"]), "rejected_reward": float(pair["rejected_score"])}


def dpo_trl(pair: dict) -> dict | None:
    if not all(isinstance(pair.get(k), str) for k in ("prompt", "chosen", "rejected")):
        return None
    return {"id": pair["id"], "prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


@dataclass(frozen=True)
class Format:
    config: str  # the dataset card's config name
    stem: str  # the file name without its extension
    convert: Callable[[dict], dict | None]
    source: str  # "sft" (kept rows) or "pairs"


FORMATS = (
    Format("sft", "sft", sft_messages, "sft"),
    Format("sft_nemo_aligner", "sft-nemo-aligner", sft_nemo_aligner, "sft"),
    Format("dpo_nemo_aligner", "dpo-nemo-aligner", dpo_nemo_aligner, "pairs"),
    Format("dpo_trl", "dpo-trl", dpo_trl, "pairs"),
)


def arrow_schema(config: str):
    import pyarrow as pa  # only when exporting: a login node's lean install never gets here

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    s = pa.string()
    fields = {
        "sft": [("id", s), ("messages", message)],
        "sft_nemo_aligner": [("id", s), ("system", s), ("mask", s), ("type", s),
                             ("conversations", pa.list_(pa.struct([("from", s), ("value", s)])))],
        "dpo_nemo_aligner": [("id", s), ("prompt", s), ("chosen_response", s), ("rejected_response", s),
                             ("chosen_reward", pa.float64()), ("rejected_reward", pa.float64())],
        "dpo_trl": [("id", s), ("prompt", message), ("chosen", message), ("rejected", message)],
    }[config]
    return pa.schema(fields)


def _columns(row: dict, names: list[str]) -> dict:
    return {k: row[k] for k in names}


def _row_group(lines: list[bytes], schema):
    """A row group's table parsed from its JSONL lines by Arrow's JSON reader, to the fixed schema. Not
    `Table.from_pylist`: its first call imports pandas (pyarrow checks every Python list for a pandas
    object), ~50 MB of the orchestrator's peak RSS for nothing (benchmarks/pipeline_rss.py)."""
    from pyarrow import json as pa_json

    data = b"".join(lines)
    return pa_json.read_json(io.BytesIO(data), read_options=pa_json.ReadOptions(use_threads=False, block_size=len(data) + 1),
                             parse_options=pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error"))


def write_format(store, fmt: Format, given: Iterable[dict]) -> dict:
    """One format's JSONL and Parquet files from `given`, streamed: converted rows go to both files in one
    pass, a Parquet row group of ROW_GROUP_ROWS at a time (memory: one row group, at any run size); each
    file staged and published whole with its sha256. Its entry for write_exports."""
    import pyarrow.parquet as pq

    schema = arrow_schema(fmt.config)
    names = schema.names  # the same columns in the same order in both files
    staging = store.staging_dir()
    staging.mkdir(parents=True, exist_ok=True)
    fd, parquet_tmp = tempfile.mkstemp(dir=staging, prefix=temp_prefix(f"{fmt.stem}.parquet"), suffix=TEMP_SUFFIX)
    os.close(fd)
    counts = {"rows": 0, "skipped": 0}
    jsonl_tmp: Path | None = None
    try:
        with pq.ParquetWriter(parquet_tmp, schema) as parquet:
            batch: list[bytes] = []  # the row group's JSONL lines: its table is parsed from them

            def lines() -> Iterator[bytes]:
                for row in given:
                    if (out := fmt.convert(row)) is None:
                        counts["skipped"] += 1
                        continue
                    batch.append(line := json_line(_columns(out, names)))
                    if len(batch) == ROW_GROUP_ROWS:
                        parquet.write_table(_row_group(batch, schema), row_group_size=ROW_GROUP_ROWS)
                        batch.clear()
                    yield line

            jsonl_tmp, jsonl_sha, counts["rows"], jsonl_size = write_lines(lines(), staging, f"{fmt.stem}.jsonl")
            if batch:
                parquet.write_table(_row_group(batch, schema), row_group_size=ROW_GROUP_ROWS)
        entry = {"config": fmt.config, "source": fmt.source, "rows": counts["rows"], "skipped": counts["skipped"],
                 "files": {}}
        if not counts["rows"]:  # no file (`datasets` cannot read a Parquet file of no rows); none left from an earlier export
            for ext in ("jsonl", "parquet"):
                store.delete(f"{fmt.stem}.{ext}")
            return entry
        parquet_sha = sha256_file(Path(parquet_tmp))
        for ext, path, sha in (("jsonl", jsonl_tmp, jsonl_sha), ("parquet", Path(parquet_tmp), parquet_sha)):
            name = f"{fmt.stem}.{ext}"
            size = path.stat().st_size
            store.publish_file(name, path, sha)
            entry["files"][ext] = {"name": name, "sha256": sha, "bytes": size}
        return entry
    finally:
        Path(parquet_tmp).unlink(missing_ok=True)
        if jsonl_tmp is not None:
            jsonl_tmp.unlink(missing_ok=True)


def write_exports(store, sft_rows: Iterable[dict] | None, pair_rows: Iterable[dict] | None) -> list[dict]:
    """Every format whose source is given, as JSONL and Parquet, into `store` (the run's `data/`);
    one entry per format: its config name, files, rows, rows it could not convert, and sha256s. A source
    is iterated once per format of it: give a list, or rows read again from their parts each time
    (infra/run/card.py StoredRows), never a one-shot generator."""
    sources = {"sft": sft_rows, "pairs": pair_rows}
    return [write_format(store, fmt, sources[fmt.source]) for fmt in FORMATS if sources[fmt.source] is not None]
