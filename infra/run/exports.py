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
Pure conversions plus one writer; the rows are converted in memory (one run's kept rows, as the
stage rows are)."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from infra.prompting.prompt_format import NEMOTRON_END, NEMOTRON_INSTRUCT

ROW_GROUP_ROWS = 1000  # rows per Parquet row group: small enough to stream, large enough to compress


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


def parquet_bytes(rows: list[dict], config: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(config)
    table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def jsonl_bytes(rows: list[dict], config: str) -> bytes:
    names = arrow_schema(config).names  # the same columns in the same order as the Parquet file
    return "".join(json.dumps({k: r[k] for k in names}, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_exports(store, sft_rows: Iterable[dict] | None, pair_rows: Iterable[dict] | None) -> list[dict]:
    """Every format whose source is given, as JSONL and Parquet, into `store` (the run's `data/`);
    one entry per format: its config name, files, rows, rows it could not convert, and sha256s."""
    sources = {"sft": None if sft_rows is None else list(sft_rows), "pairs": None if pair_rows is None else list(pair_rows)}
    out = []
    for fmt in FORMATS:
        given = sources[fmt.source]
        if given is None:
            continue
        converted = [fmt.convert(r) for r in given]
        rows = [r for r in converted if r is not None]
        entry = {"config": fmt.config, "source": fmt.source, "rows": len(rows), "skipped": len(converted) - len(rows),
                 "files": {}}
        out.append(entry)
        if not rows:  # no file (`datasets` cannot read a Parquet file of no rows); none left from an earlier export
            for ext in ("jsonl", "parquet"):
                store.delete(f"{fmt.stem}.{ext}")
            continue
        for ext, data in (("jsonl", jsonl_bytes(rows, fmt.config)), ("parquet", parquet_bytes(rows, fmt.config))):
            name = f"{fmt.stem}.{ext}"
            store.write_bytes(name, data)
            entry["files"][ext] = {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return out
