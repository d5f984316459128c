"""RolloutActor: turns prompts into groups of sampled completions with their logprobs.

A plain class; the driver makes it a Ray actor. Backends implement `generate` on token ids:
`hf` (transformers.generate; CPU or GPU) here, `vllm` on GPU. The actor owns what is common:
chat templates, prompt truncation, the weight version stamped on each Rollout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from grpo_ray.data import prompt_token_ids
from grpo_ray.errors import oom_advice
from grpo_ray.models import add_lora, load_model, load_tokenizer
from grpo_ray.parallel import torch_threads
from grpo_ray.types import AdapterWeights, EngineAdapter, Rollout, process_info
from grpo_ray.weights import load_adapter


@dataclass
class Generation:
    """One sampled completion as a backend returns it."""

    token_ids: list[int]  # up to and including EOS / the stop string
    logprobs: list[float]  # sampling logp of each token at the sampling temperature
    finish_reason: str  # "stop" | "length"


class Backend(Protocol):
    timings: dict[str, float]  # time/* beyond sampling itself: sleep mode, the last CUDA-IPC pull

    def generate(self, prompt_ids: list[list[int]], n: int, seed: int) -> list[list[Generation]]: ...
    def load_adapter(self, weights: AdapterWeights) -> None: ...


class HFBackend:
    """transformers.generate with a peft LoRA adapter that is updated in memory each step."""

    def __init__(self, cfg: Any, model_path: str, tokenizer: Any, device: str) -> None:
        self.cfg, self.tokenizer, self.device = cfg.rollout, tokenizer, torch.device(device)
        self.timings: dict[str, float] = {}
        self.model = add_lora(load_model(cfg.model, model_path, self.device), cfg.model.lora).eval()

    def load_adapter(self, weights: AdapterWeights) -> None:
        load_adapter(self.model, weights)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, seed: int) -> list[list[Generation]]:
        """n samples per prompt; logprobs from the raw logits at the sampling temperature."""
        cfg, tok = self.cfg, self.tokenizer
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompt_ids], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=self.device)
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p or None,
            repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_completion_length,
            num_return_sequences=n, stop_strings=list(cfg.stop) or None, tokenizer=tok,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            output_logits=True, return_dict_in_generate=True, **dict(cfg.generation_kwargs or {}),
        )  # fmt: skip
        tokens = out.sequences[:, width:]  # [n·B, T]
        logp = torch.stack(  # one [n·B, V] step at a time: never [n·B, T, V]
            [
                torch.log_softmax(step.float() / cfg.temperature, dim=-1).gather(-1, tokens[:, t, None]).squeeze(-1)
                for t, step in enumerate(out.logits)
            ],
            dim=1,
        )
        flat = [self._trim(tokens[i].tolist(), logp[i].tolist()) for i in range(tokens.shape[0])]
        return [flat[b * n : (b + 1) * n] for b in range(len(prompt_ids))]

    def _trim(self, tokens: list[int], logps: list[float]) -> Generation:
        """Cut at the first EOS (kept) or the end of the first stop string; else it ran out of length."""
        eos = self.tokenizer.eos_token_id
        if eos in tokens:
            end = tokens.index(eos) + 1
            return Generation(tokens[:end], logps[:end], "stop")
        for end in range(1, len(tokens) + 1) if self.cfg.stop else ():
            text = self.tokenizer.decode(tokens[:end])
            if any(s in text for s in self.cfg.stop):
                return Generation(tokens[:end], logps[:end], "stop")
        return Generation(tokens, logps, "length")


class RolloutActor:
    """Generates `num_generations` completions per prompt with the current adapter version."""

    def __init__(self, cfg: Any, model_path: str, device: str = "cpu") -> None:
        torch.set_num_threads(torch_threads(cfg.cluster.cpu_threads, cfg.cluster.rollout_engines))
        self.cfg = cfg
        self.tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
        self.backend: Backend
        if cfg.rollout.backend == "vllm":  # GPU only; the engine takes the visible CUDA device
            from grpo_ray.actors.vllm_backend import VLLMBackend

            release = cfg.cluster.placement == "colocate" and cfg.rollout.release_memory
            self.backend = VLLMBackend(cfg, model_path, self.tokenizer, release_memory=release)
        else:
            self.backend = HFBackend(cfg, model_path, self.tokenizer, device)
        self.version = 0
        self.calls = 0

    def ready(self) -> dict[str, Any]:
        """Where the actor runs and which weights it holds (the driver's watchdog and recovery use it)."""
        return process_info(self.version)

    def update_weights(self, weights: AdapterWeights | EngineAdapter) -> int:
        """Object-store path: load the learner's adapter in memory (vllm: in its own layout); returns the new version."""
        self.backend.load_adapter(weights)
        self.version = weights.version
        return self.version

    def close(self) -> None:
        """Stop the engine's own processes and free its memory (before the actor is killed)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    # vllm only: the engine's side of the CUDA-IPC and NCCL paths (grpo_ray.weights)

    def share_weights(self) -> bytes:
        """CUDA-IPC handles of the engine's base weights, for a colocated learner to build on."""
        return self.backend.share_weights()

    def map_adapter(self, shared: tuple[bytes, dict[str, list[int]]]) -> int:
        """Map the colocated learner's LoRA tensors (its `share_adapter()`) into the engine, once."""
        return self.backend.map_adapter(*shared)

    def pull_weights(self, version: int) -> int:
        """CUDA-IPC path: copy the learner's adapter (now at `version`) into the engine; returns the version."""
        self.backend.pull_adapter(version)
        self.version = version
        return self.version

    def join_weight_group(self, host: str, port: int, world_size: int, shapes: dict[str, list[int]],
                          rank: int = 1) -> None:  # fmt: skip
        """NCCL path, once: join the learner's broadcast group as `rank` (the learner is 0)."""
        self.backend.join_weight_group(host, port, world_size, shapes, rank)

    def receive_weights(self, version: int) -> int:
        """NCCL path: receive the learner's adapter (at `version`) by broadcast; returns the version."""
        self.backend.receive_adapter(version)
        self.version = version
        return self.version

    def generate(self, rows: list[dict[str, Any]], version: int, seed: int | None = None) -> Rollout:
        """Sample a group per dataset row; refuses to run on weights other than `version`.

        `seed` fixes the sampling (the driver derives it from the step, so a retried or resumed
        step samples the same completions); None draws from the actor's own call counter.
        """
        if version != self.version:
            raise RuntimeError(f"asked to generate with weight version {version}, but the rollout holds {self.version}")
        start = time.perf_counter()
        cfg = self.cfg.rollout
        prompt_ids, truncated = [], 0
        for row in rows:
            ids = prompt_token_ids(row["prompt"], self.tokenizer)
            if cfg.max_prompt_length and len(ids) > cfg.max_prompt_length:
                ids, truncated = ids[-cfg.max_prompt_length :], truncated + 1  # keep the end: the question
            prompt_ids.append(ids)
        self.calls += 1
        seed = self.cfg.trainer.seed * 100_003 + self.calls if seed is None else seed
        with oom_advice("rollout"):
            groups = self.backend.generate(prompt_ids, cfg.num_generations, seed=seed)
        gens = [g for group in groups for g in group]
        return Rollout(
            prompts=[row["prompt"] for row in rows],
            prompt_ids=prompt_ids,
            completion_ids=[g.token_ids for g in gens],
            completions=self.tokenizer.batch_decode([g.token_ids for g in gens], skip_special_tokens=True),
            sampling_logprobs=[g.logprobs for g in gens],
            finish_reasons=[g.finish_reason for g in gens],
            columns={k: [row[k] for row in rows] for k in rows[0] if k != "prompt"},
            num_generations=cfg.num_generations,
            version=self.version,
            metrics={"time/rollout": time.perf_counter() - start, "rollout/prompts_truncated": float(truncated),
                     **self.backend.timings},
        )
