#!/usr/bin/env python
"""Generation throughput: our RolloutActor (vllm backend) vs a bare vllm.LLM, one run, same settings.

Both engines get the same arguments (`vllm_backend.engine_args`: one LoRA slot of rank r, the
same memory share, dtype, max length, seed) and the same SamplingParams (n = G samples per
prompt with sampling logprobs, `ignore_eos` so every completion has `--tokens` tokens), on the
same prompt token ids. Rows:
  bare vLLM, no LoRA              lora_request=None
  bare vLLM, LoRA                 a random r-rank adapter on all linear layers, from disk
  ours (RolloutActor), LoRA       the same adapter values written into the engine's slot
Tokens/s = completion tokens / wall time of one generate call (ours includes chat templating,
tokenization and decoding: what a step pays). Both engines live at once (each its memory share)
and the rows take turns, `--reps` rounds after one warm-up each; the median per row. Taking turns
keeps a change in the host's load (another job on another GPU) from favouring one row.

  python scripts/bench_rollout.py --shape qwen2.5-0.5b --prompts 64 --g 8 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_model import ensure  # noqa: E402

from grpo_ray.actors import vllm_backend as vb  # noqa: E402
from grpo_ray.config import load_config  # noqa: E402
from grpo_ray.data import prompt_token_ids  # noqa: E402
from grpo_ray.models import load_tokenizer  # noqa: E402
from grpo_ray.types import AdapterWeights  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(model_dir: Path, r: int, alpha: int, out: Path) -> dict[str, torch.Tensor]:
    """A peft LoRA folder with random A and B on every linear layer of the model; returns its tensors."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in TARGETS:
            prefix = f"{vb.PEFT_PREFIX}{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, module.in_features, generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, r, generator=gen) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": list(TARGETS), "bias": "none"}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return tensors


def interleaved_rates(calls: dict[str, Callable[[], int]], reps: int) -> dict[str, list[float]]:
    """Completion tokens/s of each call (it returns the tokens it generated), over `reps` rounds that run
    every call once in turn after one warm-up each: a change in the host's load touches every row alike."""
    for call in calls.values():
        call()
    rates: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(reps):
        for label, call in calls.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = call()
            rates[label].append(tokens / (time.perf_counter() - start))
    return rates


def bare_calls(cfg: Any, model_dir: Path, tokenizer: Any, prompt_ids: list[list[int]], adapter_dir: Path) -> tuple[Any, dict]:
    """A bare vllm.LLM with our engine arguments, and its generate calls without and with the adapter."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    tok_dir = Path(tempfile.mkdtemp()) / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    llm = LLM(**vb.engine_args(cfg, str(model_dir), str(tok_dir)))
    g, kwargs = cfg.rollout.num_generations, vb.sampling_kwargs(cfg.rollout)
    params = [SamplingParams(n=g, seed=vb.request_seed(0, b, g), **kwargs) for b in range(len(prompt_ids))]
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]

    def generate(lora: Any) -> Callable[[], int]:
        def call() -> int:
            outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            return sum(len(o.token_ids) for out in outs for o in out.outputs)

        return call

    lora = LoRARequest("bench", 1, str(adapter_dir))
    return llm, {"bare vLLM, no LoRA": generate(None), "bare vLLM, LoRA": generate(lora)}


def ours_call(cfg: Any, model_dir: Path, rows_in: list[dict], tensors: dict[str, torch.Tensor]) -> tuple[Any, dict]:
    """Our RolloutActor with the same adapter values in its slot, and its generate call."""
    from grpo_ray.actors.rollout import RolloutActor

    actor = RolloutActor(cfg, str(model_dir), device="cuda")
    actor.update_weights(AdapterWeights(version=1, tensors=tensors))

    def call() -> int:
        return sum(len(ids) for ids in actor.generate(rows_in, version=1, seed=0).completion_ids)

    return actor, {"ours (RolloutActor), LoRA": call}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "grpo_ray_models")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--g", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="rollout.enforce_eager=true (no CUDA graphs)")
    args = parser.parse_args()
    vb.engine_environment()  # the bare engine starts as ours does (spawned, same sampler)
    model_dir = args.models / args.shape
    ensure(args.shape, model_dir)
    cfg = load_config([
        f"model.name_or_path={model_dir}", "model.dtype=auto", "rollout=vllm", f"rollout.num_generations={args.g}",
        "rollout.temperature=1.0", f"rollout.max_completion_length={args.tokens}", "rollout.max_prompt_length=128",
        "+rollout.generation_kwargs.ignore_eos=true", f"model.lora.r={args.r}", f"model.lora.alpha={2 * args.r}",
        f"rollout.enforce_eager={args.eager}", f"trainer.per_device_train_batch_size={args.g}",
    ])  # fmt: skip
    tokenizer = load_tokenizer(str(model_dir))
    rows_in = [{"prompt": [{"role": "user", "content": f"What is {i % 9 + 1}+{i // 9 % 9 + 1}? Show your steps."}]}
               for i in range(args.prompts)]  # fmt: skip
    prompt_ids = [prompt_token_ids(row["prompt"], tokenizer) for row in rows_in]
    adapter_dir = Path(tempfile.mkdtemp()) / "adapter"
    tensors = random_adapter(model_dir, args.r, 2 * args.r, adapter_dir)
    llm, calls = bare_calls(cfg, model_dir, tokenizer, prompt_ids, adapter_dir)
    actor, ours = ours_call(cfg, model_dir, rows_in, tensors)  # both engines live at once (memory share each)
    rates = interleaved_rates({**calls, **ours}, args.reps)
    llm.llm_engine.engine_core.shutdown()
    actor.backend.close()
    bare_lora = statistics.median(rates["bare vLLM, LoRA"])
    rows = []
    for label, runs in rates.items():
        median = statistics.median(runs)
        rows.append({"row": label, "tokens_per_s": round(median), "runs": [round(x) for x in runs],
                     "vs_bare_lora": round(median / bare_lora, 3), "bench": "rollout", "shape": args.shape,
                     "prompts": args.prompts, "g": args.g, "tokens": args.tokens, "r": args.r, "eager": args.eager})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print("\n| row | tokens/s | × bare vLLM with LoRA | runs |\n|---|---:|---:|---|")
    for row in rows:
        print(f"| {row['row']} | {row['tokens_per_s']} | {row['vs_bare_lora']} | {row['runs']} |")


if __name__ == "__main__":
    main()
