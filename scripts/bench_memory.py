#!/usr/bin/env python
"""Peak GPU memory and time of one learner step: Llama-3.1-8B shape, QLoRA, 8 × 20K tokens (issue 7).

Rows, each in a fresh subprocess so that peaks do not mix; one JSON line each:
  ours              model.quantization=nf4, LoRA r=16 on all linear layers, gradient_checkpointing=offload,
                    loss.kernel=triton, micro-batches of one sequence (max_tokens_per_microbatch = 20480)
  reference_kernel  ours with loss.kernel=reference (chunked torch instead of the fused kernel)
  no_offload        ours with gradient_checkpointing=on
  standard          bf16 LoRA, full [tokens × V] logits (fp32 log-softmax), gradient_checkpointing=on, all
                    8 sequences in one micro-batch: run when its analytic estimate fits in 90 % of the GPU,
                    else reported as the estimate with its breakdown (`estimated: true`)

Each row builds a model with random weights on the GPU (no download, no checkpoint): modules on
the meta device, then every parameter created on the GPU in bf16; with nf4 each decoder linear is
quantized (bitsandbytes NF4, double quantization, as model.quantization=nf4 loads) as soon as its
bf16 weight exists, so no 16 GB copy ever exists on the host or beside the 4-bit model. The step is
LearnerActor.train_step itself, the model handed to it in place of a loaded one, after a warm-up
step (kernel compilation, optimizer state, pinned host memory); then one step, timed, with
torch.cuda.max_memory_allocated / max_memory_reserved and nvidia-smi's memory.used sampled every
50 ms (the whole device, CUDA context included).

    PYTHONPATH=. python scripts/bench_memory.py             # all rows, ~5 min on an H200
    PYTHONPATH=. python scripts/bench_memory.py --quick     # small shape, smoke test (~1 min)
    PYTHONPATH=. python scripts/bench_memory.py --rows ours no_offload

Imports torch, transformers, peft, bitsandbytes, triton and grpo_ray only (no vLLM, no Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from random_model import LLAMA_31_8B  # noqa: E402

GIB = 2**30
LORA_R = 16


@dataclass(frozen=True)
class Row:
    quantization: str  # model.quantization
    gradient_checkpointing: str  # trainer.gradient_checkpointing
    kernel: str  # loss.kernel, or full_logits (the standard path's [tokens × V] log-softmax)
    micro_batch: str  # sequence: a token budget of one sequence | all: every sequence in one micro-batch
    sequence_chunk_tokens: int = 0  # trainer.sequence_chunk_tokens (0: off)


ROWS = {
    "ours": Row("nf4", "offload", "triton", "sequence"),
    "reference_kernel": Row("nf4", "offload", "reference", "sequence"),
    "no_offload": Row("nf4", "on", "triton", "sequence"),
    "standard": Row("none", "on", "full_logits", "all"),
}


@dataclass(frozen=True)
class Shape:
    config: dict[str, Any]  # LlamaConfig keys, as in a config.json
    generations: int  # sequences in the step (one prompt's group)
    prompt_tokens: int
    completion_tokens: int


SHAPES = {
    "llama-3.1-8b": Shape(LLAMA_31_8B, generations=8, prompt_tokens=512, completion_tokens=20480 - 512),
    "quick": Shape({**LLAMA_31_8B, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32768},
                   generations=8, prompt_tokens=128, completion_tokens=1024 - 128),
}  # fmt: skip


def log(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


# ------------------------------------------------------------------------------------------
# The model: random weights made on the GPU, quantized linear by linear
# ------------------------------------------------------------------------------------------


def build_model(config: Any, device: torch.device, quantize: bool) -> torch.nn.Module:
    """A LlamaForCausalLM with random bf16 weights (norms 1) on `device`; decoder linears NF4 when `quantize`."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        _materialize(layer, device, config.initializer_range, quantize)
    _materialize(model, device, config.initializer_range, quantize=False)  # embeddings, final norm, lm_head
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its inv_freq buffer was made on meta
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left on the meta device: {meta[:5]}")
    if quantize:
        model.is_loaded_in_4bit = True  # as transformers' bitsandbytes loader marks it: peft wraps Linear4bit layers
    return model.eval()


def _materialize(module: torch.nn.Module, device: torch.device, std: float, quantize: bool) -> None:
    """Replace `module`'s meta parameters, recursively, by random bf16 ones on `device` (RMSNorm weights: 1)."""
    for name, child in module.named_children():
        if quantize and type(child) is torch.nn.Linear:
            setattr(module, name, _nf4_linear(child, device, std))
        else:
            _materialize(child, device, std, quantize)
    for name, param in list(module.named_parameters(recurse=False)):
        if param.is_meta:
            if "RMSNorm" in type(module).__name__:
                value = torch.ones(param.shape, dtype=torch.bfloat16, device=device)
            else:
                value = torch.empty(param.shape, dtype=torch.bfloat16, device=device).normal_(0.0, std)
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))


def _nf4_linear(linear: torch.nn.Linear, device: torch.device, std: float) -> torch.nn.Module:
    """bitsandbytes Linear4bit (NF4, double quantization, bf16 compute) with a random weight quantized on `device`."""
    import bitsandbytes as bnb

    quantized = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
        compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta",
    )  # fmt: skip
    weight = torch.empty(linear.out_features, linear.in_features, dtype=torch.bfloat16, device=device).normal_(0.0, std)
    quantized.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
        module=quantized,
    ).to(device)  # fmt: skip  # a bf16 tensor moved "to" the device is quantized there
    return quantized


def lora_parameters(config: Any, r: int) -> int:
    """LoRA parameters with rank r on q, k, v, o, gate, up, down of every layer: r × (in + out) each."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    per_layer = (h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h)
    return r * per_layer * config.num_hidden_layers


def standard_estimate(config: Any, tokens: int) -> dict[str, float]:
    """GiB that the standard path needs at its peak, by term (an estimate: allocator slack not counted).

    weights: every parameter in bf16. adapter: LoRA in fp32 with its gradient and AdamW's two moments
    (16 B each). checkpoints: one bf16 [tokens, H] input per layer. layer: what one recomputed layer
    saves for its backward per token, bf16 q/k/v before and after RoPE, attention output, o_proj input,
    gate, up, SiLU and product, plus the two RMSNorms' fp32 copies. logits: [tokens, V] bf16 logits,
    the fp32 log-softmax kept for backward, its fp32 gradient and the bf16 gradient of the logits
    (2 + 4 + 4 + 2 = 12 B per token and vocabulary entry).
    """
    h, i, v, n_layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    params = 2 * v * h + n_layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    terms = {
        "weights": 2 * params,
        "adapter": 16 * lora_parameters(config, LORA_R),
        "checkpoints": 2 * n_layers * tokens * h,
        "layer": tokens * (2 * (2 * (h + 2 * kv) + 2 * h + 4 * i) + 4 * 2 * h),
        "logits": 12 * tokens * v,
    }
    out = {name: value / GIB for name, value in terms.items()}
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------
# The step: LearnerActor.train_step on a random rollout
# ------------------------------------------------------------------------------------------


def full_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float):
    """The standard path's log-probabilities: [N, V] logits, fp32 log-softmax, gather (entropy in chunks, no grad)."""
    from grpo_ray.logprobs import IGNORE_INDEX

    logits = (hidden @ weight.t()).float()  # [N, V]
    logprobs = logits.div_(temperature).log_softmax(-1)  # in place, as TRL divides its logits
    valid = targets != IGNORE_INDEX
    logp = logprobs.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) * valid
    with torch.no_grad():
        entropy = torch.cat([-(c.exp() * c).sum(-1) for c in logprobs.split(4096)]) * valid
    return logp, entropy


def make_learner(model: torch.nn.Module, row: Row, shape: Shape, device: torch.device, max_tokens: int | None = None) -> Any:
    """A LearnerActor configured for `row`, training `model` (handed over in place of loading one).
    `max_tokens`: its micro-batch token budget when given, else one sequence of `shape`'s (row.micro_batch)."""
    import grpo_ray.actors.learner as learner_module
    from grpo_ray.config import load_config

    sequence = shape.prompt_tokens + shape.completion_tokens if max_tokens is None else max_tokens
    cfg = load_config([
        "model.name_or_path=random-weights", f"model.quantization={row.quantization}", "model.dtype=bfloat16",
        f"model.lora.r={LORA_R}", f"model.lora.alpha={2 * LORA_R}", f"rollout.num_generations={shape.generations}",
        f"rollout.max_prompt_length={shape.prompt_tokens}", f"rollout.max_completion_length={shape.completion_tokens}",
        f"trainer.per_device_train_batch_size={shape.generations}",
        f"trainer.gradient_checkpointing={row.gradient_checkpointing}",
        f"trainer.max_tokens_per_microbatch={sequence if row.micro_batch == 'sequence' else 0}",
        f"trainer.sequence_chunk_tokens={row.sequence_chunk_tokens}",
        f"loss.kernel={'reference' if row.kernel == 'full_logits' else row.kernel}",
        "trainer.sync_check_tolerance=1e9", "logging.sample_steps=0",
    ])  # fmt: skip
    learner_module.load_model = lambda *args, **kwargs: model
    learner_module.load_tokenizer = lambda *args, **kwargs: SimpleNamespace(pad_token_id=0)
    learner = learner_module.LearnerActor(cfg, "random-weights", device=str(device))
    if row.kernel == "full_logits":
        learner.kernel = full_logits
    return learner


def random_rollout(shape: Shape, vocab: int, completion_lengths: list[int], version: int, seed: int = 0) -> Any:
    """One prompt's group: a completion of random tokens per entry of `completion_lengths`."""
    from grpo_ray.types import Rollout, ScoredRollout

    g = torch.Generator().manual_seed(seed)
    n = len(completion_lengths)
    prompt = torch.randint(3, vocab, (shape.prompt_tokens,), generator=g).tolist()
    completions = [torch.randint(3, vocab, (length,), generator=g).tolist() for length in completion_lengths]
    log_v = torch.log(torch.tensor(float(vocab)))
    sampling = [(0.1 * torch.randn(len(c), generator=g) - log_v).tolist() for c in completions]
    rollout = Rollout(
        prompts=["p"], prompt_ids=[prompt], completion_ids=completions, completions=[""] * n,
        sampling_logprobs=sampling, finish_reasons=["length"] * n, columns={}, num_generations=n, version=version,
    )  # fmt: skip
    rewards = torch.zeros(n)
    return ScoredRollout(rollout, ["r"], rewards[:, None], rewards, torch.randn(n, generator=g))


class SmiPeak:
    """The highest memory.used nvidia-smi reports while the block runs, in GiB (None if it never
    answered): of the GPU whose UUID contains `uuid`, or summed over every GPU when it is None;
    and per process (on that GPU)."""

    def __init__(self, uuid: str | None = None, interval_s: float = 0.05) -> None:
        self.uuid = uuid
        self.interval_s, self.peak, self.per_process = interval_s, None, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> float | None:
        rows = smi_rows("--query-gpu=uuid,memory.used")
        if not rows:
            return None
        used = [float(mib) for uuid, mib in rows if self.uuid is None or self.uuid in uuid]
        return (sum(used) if self.uuid is None else (used or [float(rows[0][1])])[0]) * 2**20 / GIB

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.sample()
            if value is not None:
                self.peak = max(self.peak or 0.0, value)
            for uuid, pid, mib in smi_rows("--query-compute-apps=gpu_uuid,pid,used_memory"):
                if self.uuid is None or self.uuid in uuid:
                    self.per_process[pid] = max(self.per_process.get(pid, 0.0), float(mib) * 2**20 / GIB)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "SmiPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def smi_rows(query: str) -> list[list[str]]:
    """nvidia-smi's CSV rows for `query`, split and stripped; [] when it cannot answer."""
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=5, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [[field.strip() for field in line.split(",")] for line in out.strip().splitlines() if "," in line]


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def run_row(name: str, shape_name: str) -> dict[str, Any]:
    """Build, warm up, measure one step; the row's JSON record."""
    return measure(name, ROWS[name], shape_name, SHAPES[shape_name])


def measure(name: str, row: Row, shape_name: str, shape: Shape, cap_gib: float | None = None) -> dict[str, Any]:
    """One step of `row` on `shape`: build, warm up, measure; its JSON record. `cap_gib` limits this
    process's allocations (torch.cuda.set_per_process_memory_fraction): going over is an OOM."""
    from transformers import LlamaConfig

    from grpo_ray.actors.learner import cap_memory
    from grpo_ray.errors import OutOfMemory

    config = LlamaConfig(**shape.config)
    device = torch.device("cuda", torch.cuda.current_device())
    if cap_gib is not None:
        cap_memory(device, cap_gib)  # as cluster.learner_memory_gib does in the learner actor
    tokens = shape.generations * (shape.prompt_tokens + shape.completion_tokens)
    record: dict[str, Any] = {"row": name, "shape": shape_name, **asdict(row), "tokens": tokens, "cap_gib": cap_gib,
                              "device": torch.cuda.get_device_name(device), **versions(),
                              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}  # fmt: skip
    if row.kernel == "full_logits":
        estimate = standard_estimate(config, tokens)
        record["estimate_gib"] = {k: round(v, 2) for k, v in estimate.items()}
        if estimate["total"] > 0.9 * torch.cuda.get_device_properties(device).total_memory / GIB:
            return {**record, "estimated": True}
    start = time.perf_counter()
    model = build_model(config, device, quantize=row.quantization == "nf4")
    torch.cuda.synchronize(device)
    record.update(build_s=round(time.perf_counter() - start, 1), model_gib=round(torch.cuda.memory_allocated() / GIB, 2))
    learner = make_learner(model, row, shape, device)
    try:
        # warm-up: kernels compiled, optimizer state made, and (one full-length sequence) the pinned host blocks
        # that offloading reuses allocated -- a micro-batch's worth, for about an eighth of a step
        warm_up = [shape.completion_tokens] + [64] * (shape.generations - 1)
        learner.train_step(random_rollout(shape, config.vocab_size, warm_up, learner.version, seed=1))
        scored = random_rollout(shape, config.vocab_size, [shape.completion_tokens] * shape.generations, learner.version)
        micro_batches = len(learner._micro_batches(scored))
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with SmiPeak(str(torch.cuda.get_device_properties(device).uuid)) as smi:
            start = time.perf_counter()
            metrics = learner.train_step(scored).metrics
            torch.cuda.synchronize(device)
            step_s = time.perf_counter() - start
    except (torch.OutOfMemoryError, OutOfMemory) as e:
        return {**record, "error": f"out of memory: {str(e).splitlines()[0][:300]}",
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2)}  # fmt: skip
    return {
        **record, "estimated": False, "micro_batches": micro_batches,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 2),
        "smi_peak_gib": None if smi.peak is None else round(smi.peak, 2),
        "step_s": round(step_s, 2), "tokens_per_s": round(tokens / step_s), "loss": metrics["loss"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small shape (4 layers, H=512, 8 × 1024 tokens)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per row")
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # internal: run one row here
    args = parser.parse_args()
    shape = "quick" if args.quick else "llama-3.1-8b"
    if args.row:
        log(run_row(args.row, shape))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    for name in args.rows:  # a fresh process per row: its peaks are its own
        command = [sys.executable, os.path.abspath(__file__), "--row", name] + (["--quick"] if args.quick else [])
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            log({"row": name, "shape": shape, "error": f"timed out after {args.timeout:.0f} s"})
            continue
        records = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not records:
            log({"row": name, "shape": shape, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]})
            continue
        log({**json.loads(records[-1]), "wall_s": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
