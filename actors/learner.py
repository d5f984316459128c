"""LearnerActor: LoRA policy, AdamW, GRPO loss; one optimizer step per pass over a rollout.

A plain class; the driver makes it a Ray actor. The math lives in grpo_ray.grpo (losses),
grpo_ray.logprobs (per-token logp through the kernels) and grpo_ray.weights (sync, versions).
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from grpo_ray import grpo
from grpo_ray.errors import oom_advice
from grpo_ray.metrics import sample_completions
from grpo_ray.checkpointing import apply_gradient_checkpointing, apply_sequence_chunking
from grpo_ray.logprobs import (
    PackedBatch, check_padding_free, completion_logprobs, micro_batch_indices, pack, pad_ragged, select_kernel,
)  # fmt: skip
from grpo_ray.models import add_lora, load_model, load_tokenizer, torch_dtype
from grpo_ray.parallel import LearnerGroup, torch_threads
from grpo_ray.types import AdapterWeights, EngineAdapter, ScoredRollout, StepMetrics, process_info
from grpo_ray.weights import (
    AdapterCopy,
    adapter_order,
    adapter_tensors,
    broadcast_buckets,
    bucket_buffers,
    bucket_numel,
    check_version,
    export_adapter,
    load_adapter,
    model_on_engine_weights,
    payload_bytes,
    share_tensors,
)

log = logging.getLogger("grpo_ray.learner")


LEARNER_STATE = "learner_state.pt"


class SyncCheckError(RuntimeError):
    """The rollout's sampling logprobs disagree with the learner's: the engine has other weights."""


class NonFiniteError(FloatingPointError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def cap_memory(device: torch.device, gib: float) -> None:
    """Let PyTorch in this process allocate at most `gib` GiB on `device` (cluster.learner_memory_gib):
    beyond it an out-of-memory error, not memory taken from a colocated engine."""
    index = torch.cuda.current_device() if device.index is None else device.index  # the actor's "cuda"
    total = torch.cuda.get_device_properties(index).total_memory
    if gib * 2**30 > total:
        raise ValueError(f"cluster.learner_memory_gib={gib:g} is more than the GPU has ({total / 2**30:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, index)


class LearnerActor:
    """Trains a LoRA adapter on scored rollouts; exports the adapter after each step."""

    def __init__(self, cfg: Any, model_path: str, device: str = "cpu", shared_weights: bytes | None = None,
                 rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
        """`shared_weights`: the colocated engine's `share_weights()`; the base model is then built
        on its tensors (CUDA IPC, no second copy) instead of loaded. `rank` / `world_size`: this
        worker's place among cluster.learner_workers data-parallel learners (grpo_ray.parallel)."""
        torch.manual_seed(cfg.trainer.seed)
        torch.set_num_threads(torch_threads(cfg.cluster.cpu_threads, world_size))
        self.cfg, self.device = cfg, torch.device(device)
        self.group = LearnerGroup(rank, world_size)
        if self.device.index is not None:  # collectives and streams follow the current device
            torch.cuda.set_device(self.device)
        if cfg.cluster.learner_memory_gib:
            cap_memory(self.device, cfg.cluster.learner_memory_gib)
        self.pad_id = load_tokenizer(model_path, cfg.model.trust_remote_code).pad_token_id
        base = (load_model(cfg.model, model_path, self.device) if shared_weights is None
                else model_on_engine_weights(cfg.model, model_path, shared_weights))  # fmt: skip
        self.model = add_lora(base, cfg.model.lora)
        self.model.train()
        check_padding_free(self.model, cfg.trainer.padding_free)
        apply_gradient_checkpointing(self.model, cfg.trainer.gradient_checkpointing)
        apply_sequence_chunking(self.model, cfg.trainer.sequence_chunk_tokens)
        trainer = cfg.trainer
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=trainer.lr, betas=(trainer.adam_beta1, trainer.adam_beta2), weight_decay=trainer.weight_decay
        )
        from transformers import get_scheduler

        total = trainer.max_steps * trainer.num_iterations
        self.scheduler = get_scheduler(
            trainer.lr_scheduler_type, self.optimizer, int(trainer.warmup_ratio * total), total
        )
        self.kernel = select_kernel(cfg.loss.kernel, self.device, cfg.loss.chunk_size)
        self.version = 0
        self.steps_done = 0
        self._export: tuple[dict[str, list[int]], list[torch.Tensor], AdapterCopy] | None = None  # export_engine_weights
        self.nonfinite_streak = 0

    def ready(self) -> dict[str, Any]:
        """Where the actor runs and which weights it holds (the driver's watchdog and recovery use it)."""
        return process_info(self.version)

    def export_weights(self) -> AdapterWeights:
        """The adapter at the current version, for the rollout to load."""
        return export_adapter(self.model, self.version)

    def export_engine_weights(self) -> EngineAdapter:
        """The adapter at the current version in a vLLM engine's layout (object-store path to vllm
        engines): filled into one flat buffer on the device, copied off it once."""
        if self._export is None:
            self._export = self._adapter_buckets(bucket_numel=None)
        shapes, (buffer,), fill = self._export
        fill()
        return EngineAdapter(self.version, shapes, str(buffer.dtype).removeprefix("torch."), payload_bytes(buffer))

    # the learner's side of the CUDA-IPC and NCCL paths (grpo_ray.weights)

    def adapter_spec(self) -> dict[str, list[int]]:
        """Name -> shape of each adapter tensor (peft state-dict names)."""
        return {name: list(t.shape) for name, t in adapter_tensors(self.model).items()}

    def share_adapter(self) -> tuple[bytes, dict[str, list[int]]]:
        """CUDA-IPC handles of the LoRA parameters themselves (the optimizer updates them in place), and their shapes."""
        return share_tensors(adapter_tensors(self.model)), self.adapter_spec()

    def rendezvous_address(self) -> tuple[str, int]:
        """Host and a free port for a process group's rendezvous, where this learner is rank 0."""
        import socket

        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            return ray.util.get_node_ip_address(), probe.getsockname()[1]

    def join_learner_group(self, host: str, port: int) -> None:
        """Join the data-parallel learners' process group (rank 0 listens on host:port)."""
        self.group.join(host, port, self.device)

    def join_weight_group(self, host: str, port: int, world_size: int) -> None:
        """NCCL path, once: the broadcast group with the rollout engine(s), as rank 0, and the adapter's buckets."""
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        self.weight_group = stateless_init_process_group(host, port, 0, world_size, self.device.index or 0)
        dtype = torch_dtype(self.cfg.model.dtype, "cuda")
        _, self._buckets, self._fill_buckets = self._adapter_buckets(bucket_numel(self.cfg.cluster.nccl_bucket_mb, dtype))

    def _adapter_buckets(
        self, bucket_numel: int | None
    ) -> tuple[dict[str, list[int]], list[torch.Tensor], AdapterCopy]:  # fmt: skip
        """Buckets of `bucket_numel` elements (None: one) holding the adapter in the engine's layout
        (A, B·α/r in its dtype, `adapter_pairs` order), the copy that fills them from the LoRA
        parameters (which the optimizer updates in place), and the tensors' shapes in that order."""
        lora, dtype = self.cfg.model.lora, torch_dtype(self.cfg.model.dtype, "cuda")
        tensors = adapter_tensors(self.model)
        shapes = {name: list(tensors[name].shape) for name in adapter_order(tensors)}
        sources = [tensors[name] for name in shapes]
        numel = bucket_numel or sum(t.numel() for t in sources)
        buckets, views = bucket_buffers(list(shapes.values()), dtype, self.device, numel)
        return shapes, buckets, AdapterCopy(views[0::2], sources[0::2], views[1::2], sources[1::2], lora.alpha / lora.r)

    def broadcast_weights(self) -> None:
        """NCCL path, each step: the current adapter into the buckets (one graph replay), then broadcast."""
        self._fill_buckets()
        broadcast_buckets(self._buckets, self.weight_group)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    def adapter_files(self) -> dict[str, bytes]:
        """The adapter in PEFT format (adapter_config.json, adapter_model.safetensors) as bytes."""
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            return {name: (Path(tmp) / name).read_bytes() for name in os.listdir(tmp)}

    def state_files(self) -> dict[str, bytes]:
        """Adapter files plus optimizer, scheduler, RNG and version: enough to continue exactly."""
        buffer = io.BytesIO()
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
             "rng": torch.get_rng_state(), "version": self.version, "steps_done": self.steps_done,
             "nonfinite_streak": self.nonfinite_streak},
            buffer,
        )  # fmt: skip
        return {**self.adapter_files(), LEARNER_STATE: buffer.getvalue()}

    def load_state_files(self, files: dict[str, bytes]) -> int:
        """Restore what `state_files` wrote; returns the restored weight version."""
        from safetensors.torch import load

        state = torch.load(io.BytesIO(files[LEARNER_STATE]), weights_only=False)
        load_adapter(self.model, AdapterWeights(state["version"], load(files["adapter_model.safetensors"])))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.version, self.steps_done = state["version"], state["steps_done"]
        self.nonfinite_streak = state["nonfinite_streak"]
        return self.version

    def train_step(self, scored: ScoredRollout) -> StepMetrics:
        """num_iterations optimizer steps on one scored rollout; returns the step's metrics.

        1. refuse a rollout from unexpected weights;
        2. pack completions into micro-batches; old / reference logprobs without grad when needed;
        3. per iteration: accumulate the GRPO loss over micro-batches (normalised over the whole
           batch), clip, step; 4. bump the weight version.
        """
        start = time.perf_counter()
        rollout = scored.rollout
        check_version(rollout.version, self.version, self.cfg.trainer.async_steps)
        with oom_advice("learner"):
            batches = self._micro_batches(scored)
            local = [sum(b["batch"].completion_mask.sum().item() for b in batches),
                     sum(b["batch"].attention_mask.sum().item() for b in batches)]  # fmt: skip
            num_tokens, all_tokens = self.group.sum(local, self.device)  # the whole batch's, over the workers
            self._no_grad_logprobs(batches, rollout.version)
            iterations = [
                self._optimizer_step(batches, rollout.num_completions, num_tokens)
                for _ in range(self.cfg.trainer.num_iterations)
            ]
        metrics = reduce_metrics(iterations, [1.0] * len(iterations))
        self.version += 1
        self.steps_done += 1
        metrics.update(scored.metrics)
        metrics["time/train"] = time.perf_counter() - start
        metrics["tokens/total"] = all_tokens
        metrics["perf/train_tokens_per_s"] = metrics["tokens/total"] * self.cfg.trainer.num_iterations / metrics["time/train"]
        if self.device.type == "cuda":  # this process's peak, base weights included unless shared
            metrics["memory/learner_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        logging_cfg = self.cfg.logging  # samples are picked here, so no batch travels to be logged
        samples = sample_completions(scored, logging_cfg.num_samples if logging_cfg.sample_steps else 0)
        self._settle_device()
        return StepMetrics(step=self.steps_done, version=self.version, metrics=metrics, samples=samples)

    # --- pieces of a step ----------------------------------------------------------------

    def _micro_batches(self, scored: ScoredRollout) -> list[dict[str, Any]]:
        """This worker's completions grouped into micro-batches (per_device_train_batch_size
        completions, or by trainer.max_tokens_per_microbatch), packed with their advantages and
        sampling logprobs."""
        rollout, g, trainer = scored.rollout, scored.rollout.num_generations, self.cfg.trainer
        keep = torch.tensor(
            [not (self.cfg.loss.mask_truncated_completions and r == "length") for r in rollout.finish_reasons]
        )
        mine = self.group.completions(len(rollout.prompt_ids), g)  # all of them with one learner worker
        lengths = [len(rollout.prompt_ids[i // g]) + len(rollout.completion_ids[i]) for i in mine]
        groups = [[mine[j] for j in idx] for idx in micro_batch_indices(
            lengths, trainer.per_device_train_batch_size, trainer.max_tokens_per_microbatch, trainer.padding_free
        )]  # fmt: skip
        out = []
        for idx in groups:
            batch = pack([rollout.prompt_ids[i // g] for i in idx], [rollout.completion_ids[i] for i in idx],
                         self.pad_id, trainer.padding_free)  # fmt: skip
            batch.completion_mask *= keep[idx, None].float()
            sampling = pad_ragged([rollout.sampling_logprobs[i] for i in idx], 0.0, torch.float32)
            out.append({"batch": batch.to(self.device), "advantages": scored.advantages[idx].to(self.device),
                        "sampling_logp": sampling.to(self.device)})
        return out

    def _logprobs(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logprobs(self.model, batch, self.cfg.rollout.temperature, self.kernel)

    def _settle_device(self) -> None:
        """On CUDA, finish the step's kernels: the engine may read the adapter next, from another
        process. Colocated, also hand cached memory back so the engine can map its KV cache again."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if self.cfg.cluster.placement == "colocate":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def _no_grad_logprobs(self, batches: list[dict[str, Any]], rollout_version: int) -> None:
        """old_logp (μ > 1 reuses the rollout), ref_logp (β > 0, adapter disabled), and the sync
        check on the first step and every trainer.sync_check_interval steps."""
        interval = self.cfg.trainer.sync_check_interval
        check = self.steps_done == 0 or (interval > 0 and self.steps_done % interval == 0)
        need_old = self.cfg.trainer.num_iterations > 1 or check
        for mb in batches:
            if need_old:
                mb["old_logp"] = self._logprobs(mb["batch"])[0]
            if self.cfg.loss.beta > 0:
                with self.model.disable_adapter():
                    mb["ref_logp"] = self._logprobs(mb["batch"])[0]
        if check:
            self._check_sync(batches, rollout_version)
        if self.cfg.trainer.num_iterations == 1:  # on-policy: old_logp is logp.detach() in the loss
            for mb in batches:
                mb.pop("old_logp", None)

    def _check_sync(self, batches: list[dict[str, Any]], rollout_version: int) -> None:
        """Fail loudly when the engine's logprobs are far from the learner's (stale or wrong weights)."""
        local = [sum(((mb["old_logp"] - mb["sampling_logp"]).abs() * mb["batch"].completion_mask).sum().item()
                     for mb in batches), sum(mb["batch"].completion_mask.sum().item() for mb in batches)]  # fmt: skip
        gap, tokens = self.group.sum(local, self.device)  # every worker decides on the same numbers
        mean_gap = gap / max(tokens, 1.0)
        if mean_gap > self.cfg.trainer.sync_check_tolerance:
            kv_dtype = self.cfg.rollout.kv_cache_dtype
            raise SyncCheckError(
                f"mean |learner logp - sampling logp| = {mean_gap:.4f} between the learner at weight version "
                f"{self.version} and the rollout made by version {rollout_version} exceeds "
                f"trainer.sync_check_tolerance={self.cfg.trainer.sync_check_tolerance}: the rollout engine is not "
                "sampling from the learner's weights (or uses another temperature)"
                + ("" if kv_dtype == "auto" else f", or its rollout.kv_cache_dtype={kv_dtype} attention is that far from "
                   "the learner's: set rollout.kv_cache_dtype=auto, or raise trainer.sync_check_tolerance to accept it")
            )  # fmt: skip

    def _skip_nonfinite(self, loss: float, grad_norm: float, batches: list[dict[str, Any]]) -> None:
        """Leave the weights as they are; stop the run after trainer.max_nonfinite_steps in a row."""
        streak = self.nonfinite_streak + 1
        log.warning(
            "step %d: non-finite loss %s or grad norm %s, update skipped (%d in a row); batch: %s",
            self.steps_done + 1, loss, grad_norm, streak, _batch_stats(batches),
        )  # fmt: skip
        if streak >= self.cfg.trainer.max_nonfinite_steps:
            raise NonFiniteError(
                f"{streak} optimizer steps in a row had a non-finite loss ({loss}) or gradient norm ({grad_norm}) "
                f"(trainer.max_nonfinite_steps={self.cfg.trainer.max_nonfinite_steps}); last batch: "
                f"{_batch_stats(batches)}. Lower trainer.lr, check the reward functions' values, or resume from "
                "the last checkpoint with resume=auto"
            )

    def _optimizer_step(self, batches: list[dict[str, Any]], num_sequences: int, num_tokens: float) -> dict[str, float]:
        """One pass over the micro-batches with gradient accumulation, then clip and step."""
        loss_cfg = self.cfg.loss
        per_batch, shares = [], []
        total_loss = 0.0
        for mb in batches:
            batch = mb["batch"]
            logp, entropy = self._logprobs(batch)
            loss, m = grpo.policy_loss(
                logp, mb.get("old_logp"), mb["advantages"], batch.completion_mask,
                loss_type=loss_cfg.loss_type, epsilon=loss_cfg.epsilon, epsilon_high=loss_cfg.epsilon_high,
                delta=loss_cfg.delta, beta=loss_cfg.beta, ref_logp=mb.get("ref_logp"),
                importance_sampling_level=loss_cfg.importance_sampling_level,
                max_completion_length=self.cfg.rollout.max_completion_length,
                sampling_logp=mb["sampling_logp"] if loss_cfg.importance_sampling_correction else None,
                importance_sampling_cap=loss_cfg.importance_sampling_cap,
                num_sequences=num_sequences, num_tokens=max(num_tokens, 1.0), entropy=entropy.detach(),
            )  # fmt: skip
            loss.backward()
            total_loss += loss.item()
            per_batch.append(m)
            shares.append(batch.completion_mask.sum().item())
        params = [p for p in self.model.parameters() if p.requires_grad]
        # data-parallel workers: the whole batch's gradient, loss and metrics (no-ops with one worker)
        self.group.sum_gradients(params)
        total_loss = self.group.sum([total_loss], self.device)[0]
        metrics = self.group.gather((per_batch, shares), lambda items: reduce_metrics(
            [m for parts, _ in items for m in parts], [w for _, weights in items for w in weights]))  # fmt: skip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.trainer.max_grad_norm)
        finite = math.isfinite(total_loss) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        else:
            self._skip_nonfinite(total_loss, grad_norm.item(), batches)
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        self.optimizer.zero_grad(set_to_none=True)
        metrics["numerics/skipped_update"] = float(not finite)
        metrics.update(loss=total_loss, grad_norm=grad_norm.item(), learning_rate=self.scheduler.get_last_lr()[0])
        return metrics


def _batch_stats(batches: list[dict[str, Any]]) -> str:
    adv = torch.cat([mb["advantages"] for mb in batches])
    sampling = torch.cat([mb["sampling_logp"].flatten() for mb in batches])
    return (
        f"advantages mean {adv.mean().item():.3g} std {adv.std().item():.3g} max|.| {adv.abs().max().item():.3g}; "
        f"sampling logp min {sampling.min().item():.3g}; completion tokens "
        f"{sum(mb['batch'].completion_mask.sum().item() for mb in batches):.0f}"
    )


def reduce_metrics(parts: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    """Combine per-part metrics: `*_min` by min, `*_max` by max, the rest by weighted mean."""
    total = sum(weights) or 1.0
    out: dict[str, float] = {}
    for key in parts[0] if parts else ():
        values = [p[key] for p in parts]
        if key.endswith("min"):
            out[key] = min(values)
        elif key.endswith("max"):
            out[key] = max(values)
        else:
            out[key] = sum(v * w for v, w in zip(values, weights)) / total
    return out
