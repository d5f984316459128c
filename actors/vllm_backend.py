"""vLLM rollout backend: sampling with logprobs on a vLLM engine whose LoRA changes in memory.

The engine serves one LoRA, registered once at start: a zero adapter (B = 0, which is the
learner's initial adapter) written once to a temporary folder in peft format, with the
shapes the engine itself reports. After that no adapter file is written: each update copies
the learner's values into the engine's own LoRA buffers (DESIGN.md, "Proven on the H100"):

    lora_a_stacked[s][slot, 0, :r, :] = A            peft's A as is    [r, in]
    lora_b_stacked[s][slot, 0, :, :r] = B · α / r    peft's B, scaled  [out, r]

where slice s of a fused module is one of its parts (vLLM fuses q|k|v into qkv_proj and
gate|up into gate_up_proj). The values come by one of three paths (grpo_ray.weights): bytes
through the engine's RPC (object store), a device-to-device copy from the learner's own
tensors mapped through CUDA IPC (colocated), or NCCL buckets (separate GPUs). Writes happen
between `generate` calls, when the engine is idle. Each write is served under a new LoRA
name in the same slot: vLLM hashes KV blocks with the LoRA name, so blocks cached with the
old values can never be reused, and no prefix-cache reset is needed.

Colocated (`release_memory`), the engine runs in sleep mode: it frees its KV cache after
generating and maps it back before the next generation, while its weights (outside the
sleep pool, see vllm_worker.GRPOWorker) stay where the learner maps them.

Sampling logprobs are vLLM's `processed_logprobs`: the log-softmax of the logits after
temperature (and top-k / top-p / min-p when set), i.e. of the distribution the token was
drawn from. With top_p = 1, top_k = 0, min_p = 0 this is the learner's temperature-scaled
logp exactly; with truncation it is the truncated distribution.

vllm is imported lazily: the module imports without it, and its pure helpers (name mapping,
zero adapter, sampling settings, the worker's write paths) are unit-tested on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from grpo_ray.errors import EngineStartError
from grpo_ray.types import AdapterWeights, EngineAdapter
from grpo_ray.weights import (
    PEFT_PREFIX,
    AdapterCopy,
    adapter_pairs,
    broadcast_buckets,
    bucket_buffers,
    bucket_numel,
    engine_adapter,
    open_shared_tensors,
    quantized_spec,
    share_tensors,
)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
LORA_ID = 1  # the one adapter the engine serves
WORKER_CLS = "grpo_ray.actors.vllm_worker.GRPOWorker"

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
    """(engine module, slice, A name, B name) per LoRA pair of an adapter, in `adapter_pairs`
    order (the order every sync path sends values in), shapes checked."""
    targets = engine_targets(layout, packed)
    plan = []
    for path, a_name, b_name in adapter_pairs(tensors):
        if path not in targets:
            example = next(iter(sorted(targets)), "none")
            raise ValueError(f"adapter module {path} has no LoRA layer in the vLLM engine (engine modules look like {example})")
        module, s = targets[path]
        in_features, out_features, rank = layout[module][s]
        a, b = tensors[a_name], tensors[b_name]
        r = a.shape[0]
        if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r) or r > rank:
            raise ValueError(
                f"adapter module {path}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the engine's slice "
                f"(in={in_features}, out={out_features}, max rank={rank})"
            )
        plan.append((module, s, a_name, b_name))
    return plan


def plan_targets(plan: list[tuple[str, int, str, str]]) -> tuple[list[str], list[int]]:
    """The (engine modules, slices) of a write plan, as the worker's write paths take them."""
    return [module for module, _, _, _ in plan], [s for _, s, _, _ in plan]


def plan_names(plan: list[tuple[str, int, str, str]]) -> list[str]:
    """The adapter tensor names of a write plan in the order values travel: A0, B0, A1, B1, ..."""
    return [name for _, _, a, b in plan for name in (a, b)]


def engine_args(cfg: Any, model_path: str, tokenizer_dir: str, release_memory: bool = False) -> dict[str, Any]:
    """vllm.LLM's arguments from the config: one LoRA slot of the adapter's rank, sampling logprobs
    after temperature, single-process executor, sleep mode when the engine gives memory back."""
    from grpo_ray.models import torch_dtype

    rollout = cfg.rollout
    return dict(
        model=model_path, tokenizer=tokenizer_dir, revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code, dtype=str(torch_dtype(cfg.model.dtype, "cuda")).removeprefix("torch."),
        quantization="bitsandbytes" if cfg.model.quantization == "nf4" else None,
        seed=cfg.trainer.seed, gpu_memory_utilization=rollout.gpu_memory_utilization,
        kv_cache_memory_bytes=None if rollout.kv_cache_gib is None else int(rollout.kv_cache_gib * 2**30),
        kv_cache_dtype=rollout.kv_cache_dtype,
        enforce_eager=rollout.enforce_eager, max_model_len=max_model_len(rollout), max_num_seqs=rollout.max_num_seqs,
        max_num_batched_tokens=rollout.max_num_batched_tokens,
        enable_lora=True, max_loras=1, max_lora_rank=max_lora_rank(cfg.model.lora.r),
        logprobs_mode="processed_logprobs", distributed_executor_backend="uni", enable_sleep_mode=release_memory,
        attention_config=attention_config(),
    )  # fmt: skip


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


# --- inside the engine: methods of vLLM's GPU worker (see vllm_worker.GRPOWorker) -----------


class LoRAWriterExtension:
    """The engine-side half of every sync path; `self` is vLLM's GPU worker.

    Reached through `LLM.collective_rpc(name, args=...)`; arguments and results are plain data
    and bytes (they cross a process boundary when the engine runs in its own process). An
    adapter is addressed as a plan: (modules, slices) per LoRA pair in `adapter_pairs` order,
    and values [A0, B0·α/r, A1, ...] with `shapes` in that order.
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

    def _grpo_slot_views(self, lora_id: int, modules: list[str], slices: list[int], shapes: list[list[int]]) -> list[torch.Tensor]:
        """[A0, B0, A1, B1, ...]: views of the adapter slot's first r ranks in each (module, slice)."""
        manager = self._grpo_lora_manager()
        if lora_id not in manager.lora_index_to_id:
            raise RuntimeError(f"LoRA {lora_id} is not in a GPU slot of the engine (slots: {manager.lora_index_to_id})")
        slot = manager.lora_index_to_id.index(lora_id)
        views = []
        for i, (module, s) in enumerate(zip(modules, slices)):
            layer = manager.modules[module]
            views.append(layer.lora_a_stacked[s][slot, 0, : shapes[2 * i][0], :])  # [r, in] of [max_rank, in]
            views.append(layer.lora_b_stacked[s][slot, 0, :, : shapes[2 * i + 1][1]])  # [out, r] of [out, max_rank]
        if any(list(v.shape) != list(shape) for v, shape in zip(views, shapes)):
            raise ValueError("LoRA update shapes do not fit the engine's buffers")
        return views

    def grpo_write_lora(
        self, lora_id: int, modules: list[str], slices: list[int], shapes: list[list[int]], dtype: str, payload: bytes
    ) -> int:
        """Object-store path: copy values sent as raw bytes into the adapter's slot.

        `payload` holds the values back to back (`shapes`, `dtype`): bytes cross the engine's
        msgpack transport as they are, where tensors nested in collective_rpc arguments would
        arrive undecoded. One host-to-device copy, then one `_foreach_copy_`. Returns the
        number of tensors written.
        """
        dst = self._grpo_slot_views(lora_id, modules, slices, shapes)
        flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dst[0].device).view(getattr(torch, dtype))
        src = [t.view(shape) for t, shape in zip(flat.split([math.prod(shape) for shape in shapes]), shapes)]
        torch._foreach_copy_(dst, src)
        _written(dst[0])
        return len(dst)

    def grpo_share_weights(self) -> bytes:
        """CUDA-IPC handles of every weight of the engine's model, its packed_modules_mapping, and
        for a bitsandbytes model what rebuilds each 4-bit linear (its shards' QuantStates), pickled."""
        import pickle

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        tensors = {name: p.data for name, p in model.named_parameters()}
        quantized = {name: spec for name, p in model.named_parameters()
                     if (spec := quantized_spec(name, p, tensors)) is not None}  # fmt: skip
        packed = {k: list(v) for k, v in getattr(model, "packed_modules_mapping", {}).items()}
        return pickle.dumps({"tensors": share_tensors(tensors), "packed": packed, "quantized": quantized})

    def grpo_map_adapter(self, lora_id: int, modules: list[str], slices: list[int], names: list[str], payload: bytes,
                         scale: float) -> int:  # fmt: skip
        """CUDA-IPC path, once: map the learner's LoRA tensors (`names` in plan order, A and B
        alternating) and pair them with the slot's views; `grpo_pull_adapter` copies them."""
        sources = open_shared_tensors(payload)
        src = [sources[name] for name in names]
        dst = self._grpo_slot_views(lora_id, modules, slices, [list(t.shape) for t in src])
        self._grpo_pull = AdapterCopy(dst[0::2], src[0::2], dst[1::2], src[1::2], scale)
        return len(dst)

    def grpo_pull_adapter(self) -> float:
        """CUDA-IPC path, each step: A and B·α/r from the learner's tensors into the slot, on the
        device; returns the seconds the copy took in the worker (launch to stream synchronized)."""
        start = time.perf_counter()
        self._grpo_pull()
        _written(self._grpo_pull.dst_a[0])
        return time.perf_counter() - start

    def grpo_join_weight_group(self, host: str, port: int, rank: int, world_size: int, lora_id: int,
                               modules: list[str], slices: list[int], shapes: list[list[int]], dtype: str,
                               bucket_numel: int) -> None:  # fmt: skip
        """NCCL path, once: join the learner's broadcast group (the learner is rank 0), allocate the
        adapter's buckets and capture their copy into the slot (values arrive already scaled)."""
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        group = stateless_init_process_group(host, port, rank, world_size, torch.cuda.current_device())
        self._grpo_join(group, lora_id, modules, slices, shapes, dtype, bucket_numel)

    def _grpo_join(self, group: Any, lora_id: int, modules: list[str], slices: list[int], shapes: list[list[int]],
                   dtype: str, bucket_numel: int) -> None:  # fmt: skip
        """The rest of `grpo_join_weight_group` once `group` exists (the unit tests hand in a stand-in)."""
        dst = self._grpo_slot_views(lora_id, modules, slices, shapes)
        buckets, views = bucket_buffers(shapes, getattr(torch, dtype), dst[0].device, bucket_numel)
        self._grpo_received = (group, buckets, AdapterCopy(dst[0::2], views[0::2], dst[1::2], views[1::2], 1.0))

    def grpo_receive_adapter(self) -> int:
        """NCCL path, each step: the learner's buckets arrive, then one graph replay copies them
        into the slot. Returns the number of tensors written."""
        group, buckets, copy = self._grpo_received
        broadcast_buckets(buckets, group)
        copy()
        _written(copy.dst_a[0])
        return 2 * len(copy.dst_a)


def _written(tensor: torch.Tensor) -> None:
    """Wait for a write into the engine's buffers: done before its next step reads them."""
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()


# --- the backend ------------------------------------------------------------------------


def engine_environment() -> None:
    """Environment defaults every vLLM engine here starts with (a bare one in a benchmark too)."""
    if importlib.util.find_spec("flashinfer") is None:  # vLLM's default sampler imports it
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    # The EngineCore process (VLLM_ENABLE_V1_MULTIPROCESSING=1, the default) is forked unless CUDA
    # is already initialised; forked after this process ran torch CPU ops, it hung before loading
    # the model (H100, vLLM 0.25; bench_rollout's bare engine, started before this was set, hung
    # the same way on an H200). A spawned one starts clean.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def start_engine(args: dict[str, Any]) -> Any:
    """vllm.LLM(**args) with our worker. A start-up failure is re-raised naming our settings: vLLM's
    message names its own arguments, and with the EngineCore in its own process the cause is only
    in the log above (the usual one: no room for the KV cache, or not for one max-length sequence)."""
    from vllm import LLM

    try:
        return LLM(**args, worker_cls=WORKER_CLS)
    except (RuntimeError, ValueError) as e:
        length = "the model's own limit" if args["max_model_len"] is None else args["max_model_len"]
        kv_bytes = args.get("kv_cache_memory_bytes")
        share = (f"rollout.gpu_memory_utilization (now {args['gpu_memory_utilization']})" if kv_bytes is None
                 else f"rollout.kv_cache_gib (now {kv_bytes / 2**30:g})")  # fmt: skip
        raise EngineStartError(
            f"the vLLM engine did not start: {str(e).splitlines()[0] if str(e) else type(e).__name__}. If the cause, "
            "here or in the engine's log above, is GPU memory (no room for the KV cache, or a sequence of "
            f"max_model_len = {length} tokens not fitting in it): raise {share}, or lower rollout.max_prompt_length "
            "+ rollout.max_completion_length; colocated (cluster=single_gpu), the engine's share must also leave "
            "the learner room"
        ) from e


def _shutdown(llm: Any, tmp: tempfile.TemporaryDirectory) -> None:
    """Stop the engine (its EngineCore process, if any, and its GPU memory), then drop the temp files."""
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        tmp.cleanup()


class VLLMBackend:
    """RolloutActor backend on a vLLM engine (GPU); same interface as HFBackend, plus the
    engine side of the CUDA-IPC and NCCL sync paths.

    Engine settings from the config: model.dtype, model.quantization, model.lora (rank →
    max_lora_rank, α/r → B's scale), rollout.gpu_memory_utilization, rollout.enforce_eager,
    prompt + completion budget → max_model_len, trainer.seed, cluster.nccl_bucket_mb. The
    engine runs on the visible CUDA device. `release_memory`: sleep mode, KV cache freed
    between generations (colocated with the learner).
    """

    def __init__(self, cfg: Any, model_path: str, tokenizer: Any, release_memory: bool = False) -> None:
        from grpo_ray.models import torch_dtype

        self.cfg = cfg.rollout
        lora = cfg.model.lora
        self.scale = lora.alpha / lora.r
        self.dtype = torch_dtype(cfg.model.dtype, "cuda")
        self.bucket_numel = bucket_numel(cfg.cluster.nccl_bucket_mb, self.dtype)
        self.release_memory = release_memory
        self.timings: dict[str, float] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="grpo_ray_vllm_")
        root = Path(self._tmp.name)
        # 1. the rollout's tokenizer in a folder of its own: with transformers 5, a tokenizer next
        #    to a config.json can be rebuilt as that model type's tokenizer class
        tokenizer.save_pretrained(root / "tokenizer")
        engine_environment()
        # 2. the engine, with one LoRA slot and our worker (write paths; weights outside the sleep pool)
        self.llm = start_engine(engine_args(cfg, model_path, str(root / "tokenizer"), release_memory))
        self._finalizer = weakref.finalize(self, _shutdown, self.llm, self._tmp)
        # 3. a zero adapter of the engine's shapes, written once, registered and pinned in its slot
        layout = self.llm.collective_rpc("grpo_lora_layout")[0]
        self.layout, self.packed = layout["modules"], layout["packed"]
        config, tensors = zero_adapter(self.layout, self.packed, lora.r, lora.alpha)
        from safetensors.torch import save_file

        (root / "adapter").mkdir()
        (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, str(root / "adapter" / "adapter_model.safetensors"))
        self.adapter_dir = str(root / "adapter")
        self._writes = 0  # values written into the slot so far: each is served under a new name
        self._serve_version(0)
        self.llm.llm_engine.add_lora(self.lora_request)
        self.llm.llm_engine.pin_lora(LORA_ID)
        self._plan: list[tuple[str, int, str, str]] | None = None
        if release_memory:  # asleep until the first generation: the learner builds in the free memory
            self.llm.sleep(level=1)

    def _serve_version(self, version: int) -> None:
        """Serve the slot's current values under a name never used before: new KV-block hashes, same
        slot. Named per write, not per version: a retried step or a restored checkpoint writes a
        version number again with other values, and the cached blocks of the old ones must not match."""
        from vllm.lora.request import LoRARequest

        self._writes += 1
        self.lora_request = LoRARequest(f"grpo_ray-v{version}-w{self._writes}", LORA_ID, self.adapter_dir)

    def _plan_for(self, shapes: dict[str, Any]) -> list[tuple[str, int, str, str]]:
        """The write plan of an adapter known by its shapes (name -> shape), kept while its names stay
        the same: a step's update only compares names."""
        if self._plan is None or set(plan_names(self._plan)) != set(shapes):
            meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
            self._plan = write_plan(meta, self.layout, self.packed)
        return self._plan

    @property
    def _dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def load_adapter(self, weights: AdapterWeights | EngineAdapter) -> None:
        """Object-store path: write the learner's adapter into the engine's LoRA buffers (no file, no
        reload). An EngineAdapter comes in the engine's layout already; AdapterWeights (eval, a
        peft folder) are converted here."""
        if isinstance(weights, AdapterWeights):
            weights = engine_adapter(weights, self.scale, self.dtype)
        plan = self._plan_for(weights.shapes)
        shapes = [weights.shapes[name] for name in plan_names(plan)]
        self._sync_call("grpo_write_lora", LORA_ID, *plan_targets(plan), shapes, weights.dtype, weights.payload)
        self._serve_version(weights.version)

    def _sync_call(self, method: str, *args: Any) -> Any:
        """A sync path's call into the engine (vLLM's RPC included): its result; its duration is the
        next rollout's `time/sync_engine`."""
        start = time.perf_counter()
        result = self.llm.collective_rpc(method, args=args)[0]
        self.timings["time/sync_engine"] = time.perf_counter() - start
        return result

    def share_weights(self) -> bytes:
        """CUDA-IPC handles of the engine's weights, for the learner to build its model on (no copy)."""
        return self.llm.collective_rpc("grpo_share_weights")[0]

    def map_adapter(self, payload: bytes, shapes: dict[str, list[int]]) -> int:
        """CUDA-IPC path, once: the engine maps the learner's LoRA tensors (`shapes`: name -> shape)."""
        plan = self._plan_for(shapes)
        return self.llm.collective_rpc("grpo_map_adapter", args=(
            LORA_ID, *plan_targets(plan), plan_names(plan), payload, self.scale,
        ))[0]  # fmt: skip

    def pull_adapter(self, version: int) -> None:
        """CUDA-IPC path, each step: the engine copies the learner's current adapter on the device;
        `time/sync_copy` is the copy in the worker, part of `time/sync_engine`."""
        self.timings["time/sync_copy"] = self._sync_call("grpo_pull_adapter")
        self._serve_version(version)

    def join_weight_group(self, host: str, port: int, world_size: int, shapes: dict[str, list[int]], rank: int) -> None:
        """NCCL path, once: join the learner's group as `rank`; `shapes` (name -> shape) fixes the plan."""
        plan = self._plan_for(shapes)
        self.llm.collective_rpc("grpo_join_weight_group", args=(
            host, port, rank, world_size, LORA_ID, *plan_targets(plan), [shapes[name] for name in plan_names(plan)],
            self._dtype_name, self.bucket_numel,
        ))  # fmt: skip

    def receive_adapter(self, version: int) -> None:
        """NCCL path, each step: receive the learner's broadcast into the engine's LoRA buffers."""
        self._sync_call("grpo_receive_adapter")
        self._serve_version(version)

    def generate(self, prompt_ids: list[list[int]], n: int, seed: int) -> list[list[Any]]:
        """n samples per prompt with the current adapter; [B][n] Generations. With release_memory
        the KV cache is mapped back first and freed again after."""
        from vllm import SamplingParams

        kwargs = sampling_kwargs(self.cfg)
        params = [SamplingParams(n=n, seed=request_seed(seed, b, n), **kwargs) for b in range(len(prompt_ids))]
        self._timed("time/rollout_wake", self.llm.wake_up)
        try:
            outputs = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in prompt_ids], params, lora_request=self.lora_request, use_tqdm=False
            )
        finally:
            self._timed("time/rollout_sleep", self.llm.sleep)
        return [[to_generation(o) for o in sorted(out.outputs, key=lambda o: o.index)] for out in outputs]

    def _timed(self, name: str, call: Any) -> None:
        """Run a sleep-mode call when the engine releases memory, and keep its duration for the metrics."""
        if self.release_memory:
            start = time.perf_counter()
            call()
            self.timings[name] = time.perf_counter() - start

    def close(self) -> None:
        """Shut the engine down now (also done when the backend is collected or at exit)."""
        self._finalizer()
