"""A stand-in reward model served through a REAL PyTriton/Triton server, with NeMo-Aligner's model
name, inputs and outputs (nemo_aligner/algorithms/reward_server.py, nemo-aligner 0.7.0): model
`reward_model`, inputs `sentences` (BYTES [-1], optional), `tokens` and `sequence_lengths` (INT64
[-1], optional), output `rewards` (FP32, declared [1]; 9 values per row, as Nemotron-4-340B-Reward's
unmerged regression head returns), a dynamic batcher. Only the model is a stand-in: `rewards_of`.

Run by the PyTriton environment's Python (`make pytriton`, .venv-pytriton: nvidia-pytriton pins
numpy<2, so it lives apart from the product's venv):

    python tests/reward_standin.py PORT LOG

Every sentence scored is appended to LOG (one JSON line each), so a test counts what was scored.
`rewards_of` is pure Python: the tests import it to know the scores to expect.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys

ATTRIBUTE_AT = re.compile(r"\[(helpfulness|correctness)=(-?\d+(?:\.\d+)?)\]")


def rewards_of(text: str) -> list[float]:
    """Nine floats: 0-3 from the text's hash, 4-8 HelpSteer2's five; an assistant turn may set
    helpfulness or correctness with `[helpfulness=3.5]`, else they come from the hash too."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    values = [round(b / 64, 3) for b in digest[:9]]  # 0 .. ~4, as the model card's "typically between 0 and 4"
    for name, value in ATTRIBUTE_AT.findall(text):
        values[4 if name == "helpfulness" else 5] = float(value)
    return values


def main(port: int, log: str) -> None:
    # As a job step (the reward server swapped into a Slurm job): only rank 0 serves, as in NeMo-Aligner,
    # whose other ranks wait in a broadcast loop; here they wait for the step's SIGTERM.
    if os.environ.get("SLURM_PROCID", "0") not in ("", "0"):
        signal.pause()
        return
    signal.signal(signal.SIGTERM, _interrupt)  # a stopped step: Triton stopped and its workspace cleaned

    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.model_config.common import DynamicBatcher
    from pytriton.triton import Triton, TritonConfig

    @batch
    def infer(**inputs):
        sentences = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in np.ravel(inputs["sentences"])]
        with open(log, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": s}) + "\n" for s in sentences)
        return {"rewards": np.array([rewards_of(s) for s in sentences], dtype=np.float32)}

    config = TritonConfig(allow_http=True, allow_grpc=False, allow_metrics=False, http_address="127.0.0.1",
                          http_port=port)
    with Triton(config=config) as triton:
        triton.bind(model_name="reward_model", infer_func=infer,
                    inputs=(Tensor(name="sentences", shape=(-1,), dtype=bytes, optional=True),
                            Tensor(name="tokens", shape=(-1,), dtype=np.int64, optional=True),
                            Tensor(name="sequence_lengths", shape=(-1,), dtype=np.int64, optional=True)),
                    outputs=(Tensor(name="rewards", shape=(1,), dtype=np.float32),),
                    config=ModelConfig(batching=True, max_batch_size=9999999,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=2000, preferred_batch_size=[2])))
        triton.serve()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # PyTriton's serve() stops Triton on it


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
