"""vLLM rollout backend: sampling with logprobs on a vLLM engine whose LoRA changes in memory.

The engine serves one LoRA, registered once at start: a zero adapter (B = 0, which is the
learner's initial adapter) written once to a temporary folder in peft format, with the
shapes the engine itself reports. After that no adapter file is written: `load_adapter`
copies the learner's tensors into the engine's own LoRA buffers through a worker extension
(DESIGN.md, "Proven on the H100"):

    lora_a_stacked[s][slot, 0, :r, :] = A            peft's A as is    [r, in]
    lora_b_stacked[s][slot, 0, :, :r] = B · α / r    peft's B, scaled  [out, r]

where slice s of a fused module is one of its parts (vLLM fuses q|k|v into qkv_proj and
gate|up into gate_up_proj), and then clears the prefix cache, whose KV blocks were computed
with the old adapter. Writes happen between `generate` calls, when the engine is idle.

Sampling logprobs are vLLM's `processed_logprobs`: the log-softmax of the logits after
temperature (and top-k / top-p / min-p when set), i.e. of the distribution the token was
drawn from. With top_p = 1, top_k = 0, min_p = 0 this is the learner's temperature-scaled
logp exactly; with truncation it is the truncated distribution.

vllm is imported lazily: the module imports without it, and its pure helpers (name mapping,
zero adapter, sampling settings) are unit-tested on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from grpo_ray.types import AdapterWeights

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
PEFT_PREFIX = "base_model.model."  # get_peft_model_state_dict names: PEFT_PREFIX + module + ".lora_A.weight"
LORA_ID = 1  # the one adapter the engine serves

# module name -> per slice (in_features, out_features, max_rank), as the engine reports it
Layout = dict[str, list[tuple[int, int, int]]]


# --- pure helpers (no vllm) -------------------------------------------------------------


def max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts for `max_lora_rank` that holds an adapter of rank r."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"model.lora.r={r} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")


def max_model_len(rollout_cfg: Any) -> int | None:
    """Prompt + completion budget; None (the model's own limit) when prompts are not truncated."""
    if not rollout_cfg.max_prompt_length:
        return None
    return int(rollout_cfg.max_prompt_length) + int(rollout_cfg.max_completion_length)


def sampling_kwargs(rollout_cfg: Any) -> dict[str, Any]:
    """SamplingParams fields from rollout.* (rollout.generation_kwargs are SamplingParams fields here)."""
    kwargs = dict(
        temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k,
        min_p=rollout_cfg.min_p, repetition_penalty=rollout_cfg.repetition_penalty,
        max_tokens=rollout_cfg.max_completion_length, stop=list(rollout_cfg.stop) or None,
        include_stop_str_in_output=True, logprobs=0,  # 0: only the sampled token's logprob
    )  # fmt: skip
    kwargs.update(dict(rollout_cfg.generation_kwargs or {}))
    return kwargs


def request_seed(seed: int, prompt: int, n: int) -> int:
    """Seed of prompt `prompt` (vLLM gives its n samples seed + 0..n-1): distinct across calls and prompts."""
    return (seed * 1_000_003 + prompt * n) % 2**62


def peft_module(name: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj', 'A')."""
    for kind in ("A", "B"):
        suffix = f".lora_{kind}.weight"
        if name.startswith(PEFT_PREFIX) and name.endswith(suffix):
            return name[len(PEFT_PREFIX) : -len(suffix)], kind
    raise ValueError(
        f"adapter tensor {name!r} is not a peft LoRA A/B matrix ({PEFT_PREFIX}<module>.lora_A.weight); "
        "the vllm backend serves plain LoRA on linear layers only"
    )


def engine_targets(layout: Layout, packed: dict[str, list[str]]) -> dict[str, tuple[str, int]]:
    """Every unfused module path the engine's LoRA layers cover -> (engine module, slice).

    `packed` is the model's packed_modules_mapping, e.g. qkv_proj -> [q_proj, k_proj, v_proj]:
    model.layers.0.self_attn.k_proj -> (model.layers.0.self_attn.qkv_proj, 1).
    """
    out = {}
    for module, slices in layout.items():
        parent, _, leaf = module.rpartition(".")
        parts = packed.get(leaf, [leaf])
        if len(parts) != len(slices):
            raise ValueError(f"engine LoRA module {module} has {len(slices)} slices but packs {parts}")
        for s, part in enumerate(parts):
            out[f"{parent}.{part}" if parent else part] = (module, s)
    return out


def zero_adapter(layout: Layout, packed: dict[str, list[str]], r: int, alpha: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a peft LoRA with B = 0 on every module the engine covers."""
    tensors: dict[str, torch.Tensor] = {}
    leaves = set()
    for path, (module, s) in sorted(engine_targets(layout, packed).items()):
        in_features, out_features, _ = layout[module][s]
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = torch.zeros(r, in_features)
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = torch.zeros(out_features, r)
        leaves.add(path.rpartition(".")[2])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(leaves), "bias": "none", "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False,
    }  # fmt: skip
    return config, tensors


def write_plan(
    tensors: dict[str, torch.Tensor], layout: Layout, packed: dict[str, list[str]]
) -> list[tuple[str, int, str, str]]:
    """(engine module, slice, A name, B name) for each LoRA pair of an adapter, shapes checked."""
    pairs: dict[str, dict[str, str]] = {}
    for name in tensors:
        path, kind = peft_module(name)
        pairs.setdefault(path, {})[kind] = name
    targets = engine_targets(layout, packed)
    plan = []
    for path in sorted(pairs):
        pair = pairs[path]
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter module {path} lacks its lora_{'B' if 'A' in pair else 'A'} tensor")
        if path not in targets:
            example = next(iter(sorted(targets)), "none")
            raise ValueError(f"adapter module {path} has no LoRA layer in the vLLM engine (engine modules look like {example})")
        module, s = targets[path]
        in_features, out_features, rank = layout[module][s]
        a, b = tensors[pair["A"]], tensors[pair["B"]]
        r = a.shape[0]
        if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r) or r > rank:
            raise ValueError(
                f"adapter module {path}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the engine's slice "
                f"(in={in_features}, out={out_features}, max rank={rank})"
            )
        plan.append((module, s, pair["A"], pair["B"]))
    return plan


def to_generation(output: Any) -> Any:
    """A vLLM CompletionOutput as the rollout's Generation (tokens, sampling logprobs, finish reason)."""
    from grpo_ray.actors.rollout import Generation

    ids = list(output.token_ids)
    if output.logprobs is None or len(output.logprobs) != len(ids):
        raise RuntimeError("vLLM returned no logprob for some sampled tokens (SamplingParams.logprobs must be 0)")
    logprobs = [float(step[token].logprob) for token, step in zip(ids, output.logprobs)]
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a completion with reason {output.finish_reason!r}")
    return Generation(ids, logprobs, output.finish_reason)


def attention_config() -> dict[str, str] | None:
    """Triton attention where vLLM's FlashAttention kernels are not installed (offline bundles drop them)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return None
    fa_dir = Path(spec.origin).parent / "vllm_flash_attn"
    return None if any(fa_dir.glob("_vllm_fa*_C*.so")) else {"backend": "TRITON_ATTN"}


# --- inside the engine: mixed into vLLM's GPU worker ------------------------------------


class LoRAWriterExtension:
    """`worker_extension_cls` of the engine: these methods run in the worker, `self` is the worker.

    Reached through `LLM.collective_rpc(name, args=...)`; arguments and results are plain data
    and CPU tensors (they cross a process boundary when the engine runs in its own process).
    """

    def _grpo_lora_manager(self) -> Any:
        return self.model_runner.lora_manager._adapter_manager  # type: ignore[attr-defined]

    def grpo_lora_layout(self) -> dict[str, Any]:
        """{"modules": Layout, "packed": packed_modules_mapping} of the engine's LoRA layers."""
        manager = self._grpo_lora_manager()
        modules = {
            name: [(int(a.shape[-1]), int(b.shape[-2]), int(a.shape[-2])) for a, b in zip(m.lora_a_stacked, m.lora_b_stacked)]
            for name, m in manager.modules.items()
        }
        return {"modules": modules, "packed": {k: list(v) for k, v in manager.packed_modules_mapping.items()}}

    def grpo_write_lora(
        self, lora_id: int, modules: list[str], slices: list[int], shapes: list[list[int]], dtype: str, payload: bytes
    ) -> int:
        """Copy A [r, in] and scaled B [out, r] of each (module, slice) into the adapter's slot.

        `payload` holds the tensors A0, B0, A1, B1, ... (`shapes`, `dtype`) back to back as raw
        bytes: bytes cross the engine's msgpack transport as they are, where tensors nested in
        collective_rpc arguments would arrive undecoded. One host-to-device copy, then one
        `_foreach_copy_` into the buffers. Returns the number of tensors written.
        """
        manager = self._grpo_lora_manager()
        if lora_id not in manager.lora_index_to_id:
            raise RuntimeError(f"LoRA {lora_id} is not in a GPU slot of the engine (slots: {manager.lora_index_to_id})")
        slot = manager.lora_index_to_id.index(lora_id)
        dst = []
        for module, s in zip(modules, slices):
            layer = manager.modules[module]
            dst.append(layer.lora_a_stacked[s][slot, 0])  # [max_rank, in]
            dst.append(layer.lora_b_stacked[s][slot, 0])  # [out, max_rank]
        dst = [d[: shape[0], :] if i % 2 == 0 else d[:, : shape[1]] for i, (d, shape) in enumerate(zip(dst, shapes))]
        flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dst[0].device).view(getattr(torch, dtype))
        src = [t.view(shape) for t, shape in zip(flat.split([math.prod(shape) for shape in shapes]), shapes)]
        if any(d.shape != t.shape for d, t in zip(dst, src)):
            raise ValueError("LoRA update shapes do not fit the engine's buffers")
        torch._foreach_copy_(dst, src)
        if flat.is_cuda:  # written before the engine's next step, and before `payload` goes
            torch.cuda.current_stream(flat.device).synchronize()
        return len(dst)


# --- the backend ------------------------------------------------------------------------


def _shutdown(llm: Any, tmp: tempfile.TemporaryDirectory) -> None:
    """Stop the engine (its EngineCore process, if any, and its GPU memory), then drop the temp files."""
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        tmp.cleanup()


class VLLMBackend:
    """RolloutActor backend on a vLLM engine (GPU); same interface as HFBackend.

    Engine settings from the config: model.dtype, model.lora (rank → max_lora_rank, α/r → B's
    scale), rollout.gpu_memory_utilization, rollout.enforce_eager, prompt + completion budget →
    max_model_len, trainer.seed. The engine runs on the visible CUDA device.
    """

    def __init__(self, cfg: Any, model_path: str, tokenizer: Any) -> None:
        from grpo_ray.models import torch_dtype

        self.cfg = cfg.rollout
        lora = cfg.model.lora
        self.scale = lora.alpha / lora.r
        self.dtype = torch_dtype(cfg.model.dtype, "cuda")
        self._tmp = tempfile.TemporaryDirectory(prefix="grpo_ray_vllm_")
        root = Path(self._tmp.name)
        # 1. the rollout's tokenizer in a folder of its own: with transformers 5, a tokenizer next
        #    to a config.json can be rebuilt as that model type's tokenizer class
        tokenizer.save_pretrained(root / "tokenizer")
        if importlib.util.find_spec("flashinfer") is None:  # vLLM's default sampler imports it
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        # The EngineCore process (VLLM_ENABLE_V1_MULTIPROCESSING=1, the default) is forked unless
        # CUDA is already initialised; forked after this process ran torch CPU ops, it hung while
        # loading the model (H100, vLLM 0.25). A spawned one starts clean.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        # 2. the engine, with one LoRA slot and our writer mixed into its worker
        self.llm = LLM(
            model=model_path, tokenizer=str(root / "tokenizer"), revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code, dtype=str(self.dtype).removeprefix("torch."),
            quantization="bitsandbytes" if cfg.model.quantization == "nf4" else None,
            seed=cfg.trainer.seed, gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            enforce_eager=self.cfg.enforce_eager, max_model_len=max_model_len(self.cfg),
            enable_lora=True, max_loras=1, max_lora_rank=max_lora_rank(lora.r),
            logprobs_mode="processed_logprobs", worker_extension_cls=f"{__name__}.LoRAWriterExtension",
            attention_config=attention_config(),
        )  # fmt: skip
        self._finalizer = weakref.finalize(self, _shutdown, self.llm, self._tmp)
        # 3. a zero adapter of the engine's shapes, written once, registered and pinned in its slot
        layout = self.llm.collective_rpc("grpo_lora_layout")[0]
        self.layout, self.packed = layout["modules"], layout["packed"]
        config, tensors = zero_adapter(self.layout, self.packed, lora.r, lora.alpha)
        from safetensors.torch import save_file

        (root / "adapter").mkdir()
        (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, str(root / "adapter" / "adapter_model.safetensors"))
        self.lora_request = LoRARequest("grpo_ray", LORA_ID, str(root / "adapter"))
        self.llm.llm_engine.add_lora(self.lora_request)
        self.llm.llm_engine.pin_lora(LORA_ID)
        self._plan: list[tuple[str, int, str, str]] | None = None

    def load_adapter(self, weights: AdapterWeights) -> None:
        """Write the learner's adapter into the engine's LoRA buffers (no file, no reload)."""
        if self._plan is None or {n for _, _, a, b in self._plan for n in (a, b)} != set(weights.tensors):
            self._plan = write_plan(weights.tensors, self.layout, self.packed)
        t = weights.tensors
        tensors = [m for _, _, a, b in self._plan for m in (t[a].to(self.dtype), (t[b].float() * self.scale).to(self.dtype))]
        payload = torch.cat([m.reshape(-1) for m in tensors]).view(torch.uint8).numpy().tobytes()
        self.llm.collective_rpc("grpo_write_lora", args=(
            LORA_ID, [m for m, _, _, _ in self._plan], [s for _, s, _, _ in self._plan],
            [list(m.shape) for m in tensors], str(self.dtype).removeprefix("torch."), payload,
        ))  # fmt: skip
        if not self.llm.reset_prefix_cache():  # cached KV blocks hold the old adapter's keys and values
            raise RuntimeError("vLLM refused to reset its prefix cache after a LoRA update (requests still running?)")

    def generate(self, prompt_ids: list[list[int]], n: int, seed: int) -> list[list[Any]]:
        """n samples per prompt with the current adapter; [B][n] Generations."""
        from vllm import SamplingParams

        kwargs = sampling_kwargs(self.cfg)
        params = [SamplingParams(n=n, seed=request_seed(seed, b, n), **kwargs) for b in range(len(prompt_ids))]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], params, lora_request=self.lora_request, use_tqdm=False
        )
        return [[to_generation(o) for o in sorted(out.outputs, key=lambda o: o.index)] for out in outputs]

    def close(self) -> None:
        """Shut the engine down now (also done when the backend is collected or at exit)."""
        self._finalizer()
