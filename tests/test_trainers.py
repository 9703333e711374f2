"""The trainer files as a trainer takes them (issue 29, "Outputs a trainer loads as they are"): TRL's own
SFTTrainer and DPOTrainer load a run's `sft` and `dpo_trl` configs through the run folder's dataset card
(`datasets.load_dataset(run_dir, config)`, no options, no column mapping) and train a step on the tiny
random-weight model, on the CPU. The chat template is the trainer's choice (the tiny model has none); the
data is the run's, unchanged. NeMo-Aligner's files are checked against its schema in tests/test_exports.py
(it needs NeMo and a GPU stack)."""

from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never the Hub

import datasets  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from infra.recipes.pairs import PairParams, make_pairs, pair_row  # noqa: E402
from infra.run.card import publish_dataset  # noqa: E402
from infra.settings import Settings  # noqa: E402
from infra.storage import open_output_store  # noqa: E402
from tests.test_exports import rows  # noqa: E402

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def run_dir(tmp_path):
    params = PairParams(score="judge.score", min_margin=1)
    kept = rows(6, samples=3)
    pairs = [pair_row(p, params) for p in make_pairs(kept, params).pairs]
    root = open_output_store(str(tmp_path / "out"), "t1", Settings().s3, tmp_path / "staging")
    data = open_output_store(str(tmp_path / "out" / "t1"), "data", Settings().s3, tmp_path / "staging")
    got = publish_dataset(root, data, "t1", kept, pairs, {"models": ["gen"], "stages": []})
    assert {e["config"]: e["rows"] for e in got["exports"]} == {
        "sft": 18, "sft_nemo_aligner": 18, "dpo_nemo_aligner": len(pairs), "dpo_trl": len(pairs)} and pairs
    return tmp_path / "out" / "t1"


@pytest.mark.parametrize("config, trainer, args", [("sft", SFTTrainer, SFTConfig), ("dpo_trl", DPOTrainer, DPOConfig)])
def test_trl_trains_a_step_on_the_runs_export_as_it_is(run_dir, tmp_path, tiny_model_dir, config, trainer, args):
    train = datasets.load_dataset(str(run_dir), config, split="train", cache_dir=str(tmp_path / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHAT
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    run = trainer(model=model, processing_class=tokenizer, train_dataset=train,
                  args=args(output_dir=str(tmp_path / config), max_steps=1, per_device_train_batch_size=2, report_to=[],
                            use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0))
    # TRL kept every row: it drops what it cannot read as its conversational type, silently
    assert len(run.train_dataset) == len(train) > 0
    out = run.train()
    assert out.global_step == 1 and math.isfinite(out.training_loss)
