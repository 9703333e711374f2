"""NeMo's own `/generate` server, backed by the project's local engines: the contract's reference.

`python -m tests.nemo_reference --engine simulated --port P` serves PUT /generate on
127.0.0.1:P with the `text_generation_server.py` (TGS) that the `nemo_toolkit==2.0.0` wheel
ships (`make install` adds it with `--no-deps`; byte-identical from NeMo 1.23.0 to 2.0.0, so it
is the code the nemo:24.05 container, NeMo 2.0.0rc0, runs). The tests run the client's
contract tests against this process and against `serve-local`: where they differ, NeMo is
right and the local server is fixed.

What is real:
- TGS itself, loaded from the wheel's file by path and run unmodified: `MegatronGenerate.put()`
  (key checks, every validation message, the 128-sentence 400, its defaults, the lock, the
  `del output['full_logprob']`) and `MegatronServer` (the Flask app, flask_restful's `Api`,
  `app.run(threaded=True)`, i.e. Werkzeug's development server).
- Flask, flask_restful and Werkzeug: the installed packages (405/404/415/400 bodies, 500 on an
  exception, how a returned string becomes HTTP 200 + a JSON string).

What is a stand-in, and why (each is inserted into sys.modules only while TGS loads, then the
previous entries are put back, so nothing else in the process sees them):
- `torch`: TGS uses it for `torch.cuda.LongTensor` + `torch.distributed.broadcast` (telling the
  other ranks "generate now", which needs CUDA and an initialised process group) and for
  `isinstance(x, torch.Tensor)`. The stand-in records the broadcast; its `Tensor` is a class
  nothing is an instance of, because the stand-in `generate()` returns plain lists (what
  TGS's `.tolist()` would make of tensors).
- `nemo.collections.nlp.modules.common.text_generation_utils.generate` (TGU): Megatron model
  parallel generation on GPUs. The stand-in takes TGU's signature and runs a local engine
  (`infra/local_server/simulated_model.py`, or `transformers_model.py` on a tiny model), returning
  TGU's output dict: sentences, tokens, logprob, full_logprob (the key always present, as TGU
  sets it), token_ids, offsets. Like TGU it iterates `inputs` (a string gives one prompt per
  character), needs the "do generate" broadcast first, and raises for all_probs without
  compute_logprob (TGU's synced_generate then broadcasts a None / reads an unbound dtype).
- `...retro_inference_strategies`: RETRO classes TGS only uses in `isinstance` checks.
- `nemo.utils.logging`: NeMo's logger pulls in most of NeMo; a stdlib logger named `nemo`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
import types
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

NEMO_VERSION = "2.0.0"
# NeMo >= 2.1's own POST /v1/completions (the `nemo-openai` engine) is in the same file at 2.1.0
# (identical at 2.2.0, 2.3.0 and later HEADs: reference/openai-engines.md §3): `--nemo-version 2.1.0`.
NEMO_VERSIONS = ("2.0.0", "2.1.0")
TGS_NAME = "nemo.collections.nlp.modules.common.text_generation_server"
_COMMON = "nemo.collections.nlp.modules.common"
GENERATE_NUM = 0  # TGS's "do generate" broadcast value


class ReferenceUnavailable(RuntimeError):
    """nemo_toolkit is missing or another version than the one the tests describe."""


WHEEL_DIR = Path(__file__).resolve().parents[1] / ".cache" / "wheels"


def tgs_path(version: str = NEMO_VERSION) -> Path:
    """The wheel's text_generation_server.py, taken out of the downloaded wheel once.

    The wheel is downloaded (`make install`: `pip download --no-deps`), never installed: it would
    put NeMo and a top-level `tests` package, which shadows ours, into site-packages."""
    glob = f"nemo_toolkit-{version}-*.whl"
    wheels = sorted(WHEEL_DIR.glob(glob))
    if not wheels:
        raise ReferenceUnavailable(
            f"nemo_toolkit=={version} is needed for NeMo's own server code and {WHEEL_DIR} has no {glob}: "
            f"run `make install`, or `.venv/bin/pip download --no-deps nemo_toolkit=={version} -d {WHEEL_DIR}`."
        )
    member = "/".join(TGS_NAME.split(".")) + ".py"
    target = WHEEL_DIR / f"nemo-{version}" / member
    if not target.is_file():
        with zipfile.ZipFile(wheels[-1]) as wheel:
            try:
                data = wheel.read(member)
            except KeyError:
                raise ReferenceUnavailable(f"{wheels[-1]} has no {member}: download it again.") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)  # concurrent test processes: whole file or none
    return target


class Broadcasts:
    """Stand-in for the world-group broadcast: what the other ranks would have received."""

    def __init__(self) -> None:
        self.pending: list[int] = []

    def broadcast(self, tensor: list, src: int, group: object = None) -> None:
        assert src == 0, f"TGS broadcasts from rank 0, not {src}"
        self.pending.extend(tensor)

    def take_generate(self) -> None:
        # The other ranks enter generate() only after receiving GENERATE_NUM.
        if self.pending != [GENERATE_NUM]:
            raise RuntimeError(f"generate() without TGS's do-generate broadcast (saw {self.pending})")
        self.pending.clear()


class EngineGenerate:
    """Stand-in for TGU's `generate()`, with its signature, running a local engine."""

    def __init__(self, broadcasts: Broadcasts):
        self.broadcasts = broadcasts

    def __call__(
        self, model, inputs=None, tokens_to_generate=0, all_probs=False, temperature=1.0, add_BOS=False,
        top_k=0, top_p=0.0, greedy=False, repetition_penalty=1.0, end_strings=("<|endoftext|>",),
        min_tokens_to_generate=0, compute_logprob=False, random_seed=None, **strategy_args,
    ) -> dict:
        from infra.local_server.nemo_generation import GenerateParams, build_reply

        self.broadcasts.take_generate()
        if strategy_args:
            raise NotImplementedError(f"strategy arguments {sorted(strategy_args)} (p-tuning/RETRO) are not modelled")
        if all_probs and not compute_logprob:
            raise ValueError("all_probs without compute_logprob: TGU has no full logits to send")
        params = GenerateParams(
            tokens_to_generate=tokens_to_generate, temperature=temperature, add_BOS=add_BOS, top_k=top_k,
            top_p=top_p, greedy=greedy, repetition_penalty=repetition_penalty,
            min_tokens_to_generate=min_tokens_to_generate, end_strings=tuple(end_strings),
            compute_logprob=compute_logprob, all_probs=all_probs, random_seed=random_seed,
        )
        prompts = [s for s in inputs]  # TGS's tokenize_batch: `for s in sentences`
        reply = build_reply(model, model.generate(prompts, params), params)
        return {"full_logprob": None, **reply}


class _NeverATensor:
    """`torch.Tensor` for TGS's isinstance check: the stand-in generate returns lists."""


def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _stand_ins(broadcasts: Broadcasts) -> dict[str, types.ModuleType]:
    torch = _module(
        "torch",
        Tensor=_NeverATensor,
        cuda=_module("torch.cuda", LongTensor=list),
        distributed=_module("torch.distributed", broadcast=broadcasts.broadcast),
    )
    retro = _module(
        f"{_COMMON}.retro_inference_strategies",
        RetroModelTextGenerationStrategy=type("RetroModelTextGenerationStrategy", (), {}),
        RetroQAModelTextGenerationStrategy=type("RetroQAModelTextGenerationStrategy", (), {}),
    )
    return {
        "torch": torch,
        f"{_COMMON}.retro_inference_strategies": retro,
        f"{_COMMON}.text_generation_utils": _module(f"{_COMMON}.text_generation_utils",
                                                    generate=EngineGenerate(broadcasts)),
        "nemo.utils": _module("nemo.utils", logging=logging.getLogger("nemo")),
        # 2.1.0's chat route only (a Base checkpoint has no chat prompt tokens: not modelled).
        _SFT_CHAT: _module(_SFT_CHAT, _get_header_conversation_type_mask_role=_not_modelled,
                           get_prompt_template_example=_not_modelled),
    }


_SFT_CHAT = "nemo.collections.nlp.data.language_modeling.megatron.gpt_sft_chat_dataset"


def _not_modelled(*args, **kwargs):
    raise NotImplementedError("NeMo's chat prompt templates are not modelled (/v1/chat/completions)")


@contextlib.contextmanager
def _modules_replaced(replacements: dict[str, types.ModuleType]) -> Iterator[None]:
    saved = {name: sys.modules.get(name) for name in replacements}
    sys.modules.update(replacements)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def load_tgs(version: str = NEMO_VERSION) -> types.ModuleType:
    """NeMo's text_generation_server module, its GPU-only imports replaced by the stand-ins.

    Registered in sys.modules under its real name: Flask(__name__) looks the module up there to
    find its root path (and so whether it has a static folder: it has none).
    """
    path = tgs_path(version)
    spec = importlib.util.spec_from_file_location(TGS_NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with _modules_replaced(_stand_ins(Broadcasts())):
        sys.modules[TGS_NAME] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[TGS_NAME]
            raise
    return module


def _load_engine(args: argparse.Namespace):
    from infra.local_server.simulated_model import SimulatedEngine
    from infra.local_server.transformers_model import TransformersEngine

    if args.engine == "simulated":
        return SimulatedEngine(finish_fraction=args.sim_finish_fraction)
    if args.model_dir is None:
        raise SystemExit("nemo_reference: --engine transformers needs --model-dir DIR")
    return TransformersEngine(args.model_dir, threads=args.torch_threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nemo_reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine", choices=("simulated", "transformers"), default="simulated")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--sim-finish-fraction", type=float, default=0.0)
    parser.add_argument("--nemo-version", choices=NEMO_VERSIONS, default=NEMO_VERSION,
                        help="2.1.0 adds NeMo's own POST /v1/completions (the nemo-openai engine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tgs = load_tgs(args.nemo_version)
    except ReferenceUnavailable as exc:
        print(f"nemo_reference: {exc}", file=sys.stderr)
        return 2
    engine = _load_engine(args)  # before binding, as megatron_gpt_eval loads the model first
    tgs.MegatronServer(engine).run(args.host, port=args.port)  # blocks; Werkzeug stops on SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
