"""Build a tiny random-weight causal LM and its tokenizer, fully offline.

The local server's transformers engine needs *some* model that `AutoTokenizer` and
`AutoModelForCausalLM.from_pretrained(dir)` can load with HF_HUB_OFFLINE=1 on a machine with
no internet and no GPU. The text it writes is gibberish; what matters is that every moving
part (tokenizer, batched generation, end strings, the prompt echo) is real.

Choices, and why:
- Llama architecture (RoPE, like Nemotron-4), 2 layers, hidden 64, 4096 positions: loads in
  well under a second and generates a few hundred tokens/s on one CPU core.
- Byte-level BPE trained here with the `tokenizers` library on a built-in English text, so
  no download is needed. No prefix space is added and `clean_up_tokenization_spaces` is off,
  so `decode(encode(text)) == text` for ordinary text (the echo contract depends on it).
- `<|endoftext|>` is bos, eos and pad at once (id 0), as NeMo's GPT tokenizers do with EOD.
- Deterministic: a fixed torch seed and a fixed corpus give the same files every time.
- Idempotent and atomic (infra/local_server/model_dir.py): built in a temp dir next to the target, then renamed into place;
  a directory that already holds a model is left alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from infra.local_server.model_dir import build_model_dir
from infra.local_server.nemo_generation import EOS_TOKEN

log = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 1024
SEED = 1234
# Files whose presence means "a model is already here".

# A few paragraphs of plain English: enough for BPE merges of common words and punctuation.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Synthetic data generation uses a large language model to write new training examples. Each example
starts from a prompt, and the model continues the text until it reaches an end string or runs out of
tokens. The orchestrator sends batches of prompts to the server, waits for the answers, strips the
prompt from each reply, and writes one JSON object per line to the output file.
When the weather is fine, people walk in the park, read books under the trees, and talk with their
friends about work, music, food, travel and the news of the day. Children play games on the grass
while their parents watch and drink coffee. In the evening the city lights come on one by one.
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are there in a week? Answer: There are seven days in a week.
Question: Why is the sky blue? Answer: Sunlight is scattered by the air, and blue light is scattered
more than red light, so the sky looks blue during the day.
Write a short story about a robot who learns to paint. Once upon a time there was a small robot named
Pixel. Every morning it cleaned the studio of an old painter, and every evening it watched the painter
mix colours on a wooden palette. One day the painter fell ill, and Pixel picked up a brush for the first
time. Its first painting was a mess of grey lines, but it tried again, and again, and again.
Numbers and dates matter too: 1, 2, 3, 10, 42, 100, 2024, 3.14, 50%, $20, 12:30, 2024-06-05.
Code appears in prompts as well: def add(a, b): return a + b. for i in range(10): print(i).
{"id": 1, "prompt": "Hello", "completion": "world"} [1, 2, 3] (x + y) * z = w; a <= b, c >= d.
The server answers with the prompt followed by the generated text. It stops when the text ends with one
of the end strings, or when the model emits the end-of-text token, or when it has generated enough tokens.
Good data is diverse, correct, and safe. Bad data is repetitive, wrong, or harmful. Filters remove the
bad examples, and reviewers check a sample of the good ones by hand before the data is used for training.
"""


def make_tiny_model(model_dir: str | os.PathLike[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Write a tiny model + tokenizer to `model_dir` unless one is already there. Returns the path."""
    return build_model_dir(model_dir, lambda out: _build(out, vocab_size), what="tiny model")


def _build(out: Path, vocab_size: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = _train_tokenizer(vocab_size)
    tokenizer.save_pretrained(out)
    model = _random_model(len(tokenizer), tokenizer.convert_tokens_to_ids(EOS_TOKEN))
    model.save_pretrained(out)


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would break decode(encode(prompt)) == prompt.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _random_model(vocab_size: int, eos_id: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.eval()
    return model
