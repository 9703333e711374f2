"""The reward stage (docs/pipelines.md, "Reward stage"): a reward model scores each row of its parent
stage, and thresholds on the scores keep or drop it.

- `client.py`: the HTTP clients of a reward server: NeMo-Aligner's (PyTriton, Triton's KServe v2 HTTP
  API, model `reward_model`), an OpenAI-compatible reward endpoint (NVIDIA's hosted one), a vLLM
  pooling server (`/pooling`, `/classify`);
- `conversation.py`: the conversation a row is scored as, in the reward model's own format, and the
  check that it fits the model's context;
- `scores.py`: the reply read as named attributes and a weighted scalar, and the `keep_if` filters;
- `stage.py`: a stage's rows scored shard by shard, the replies checkpointed next to each part as the
  judge's are, and the stage curated with no server.
"""
