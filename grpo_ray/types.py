"""The records that travel between actors through the Ray object store.

Shape letters, used in comments across the package: B prompts, G generations per prompt
(`num_generations`), N = B·G completions (each prompt's G adjacent), L completion tokens,
P prompt tokens, F reward functions, V vocabulary, H hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Messages = list[dict[str, str]]


@dataclass
class Rollout:
    """B groups of G completions, made by the weights of one version.

    Per-completion lists have N = B·G entries; completion i answers prompt i // G.
    """

    prompts: list[str | Messages]  # [B] the dataset rows' prompts, as given to reward functions
    prompt_ids: list[list[int]]  # [B][P_b] token ids the model saw (chat template applied, truncated)
    completion_ids: list[list[int]]  # [N][L_i] sampled tokens, up to and including EOS
    completions: list[str]  # [N] decoded text (special tokens skipped)
    sampling_logprobs: list[list[float]]  # [N][L_i] the engine's logp of each sampled token at its temperature
    finish_reasons: list[str]  # [N] "stop" (EOS or a stop string) | "length"
    columns: dict[str, list[Any]]  # name -> [B] the rows' other columns (answer, ...)
    num_generations: int  # G
    version: int  # weight version that generated it
    metrics: dict[str, float] = field(default_factory=dict)  # time/rollout, prompts truncated, ...

    @property
    def num_completions(self) -> int:
        return len(self.completion_ids)

    @classmethod
    def concat(cls, parts: Sequence["Rollout"]) -> "Rollout":
        """The groups of several rollouts of one version, in order (the shares of several engines).
        Metrics: time/* is the slowest part's, counts are summed."""
        if len({p.version for p in parts}) != 1 or len({p.num_generations for p in parts}) != 1:
            raise ValueError(f"rollouts of versions {[p.version for p in parts]} and group sizes "
                             f"{[p.num_generations for p in parts]} cannot form one step")  # fmt: skip
        if len(parts) == 1:
            return parts[0]
        metrics: dict[str, float] = {}
        for part in parts:
            for key, value in part.metrics.items():
                before = metrics.get(key)
                metrics[key] = value if before is None else max(before, value) if key.startswith("time/") else before + value
        lists = {name: [x for p in parts for x in getattr(p, name)] for name in (
            "prompts", "prompt_ids", "completion_ids", "completions", "sampling_logprobs", "finish_reasons")}  # fmt: skip
        columns = {k: [x for p in parts for x in p.columns[k]] for k in parts[0].columns}
        return cls(**lists, columns=columns, num_generations=parts[0].num_generations, version=parts[0].version,
                   metrics=metrics)  # fmt: skip

    def group_slice(self, start: int, stop: int) -> "Rollout":
        """Groups [start, stop) as a Rollout of their own (what a reward actor scores)."""
        g = self.num_generations
        c = slice(start * g, stop * g)
        return Rollout(
            prompts=self.prompts[start:stop],
            prompt_ids=self.prompt_ids[start:stop],
            completion_ids=self.completion_ids[c],
            completions=self.completions[c],
            sampling_logprobs=self.sampling_logprobs[c],
            finish_reasons=self.finish_reasons[c],
            columns={k: v[start:stop] for k, v in self.columns.items()},
            num_generations=g,
            version=self.version,
        )


@dataclass
class ScoredRollout:
    """A rollout with its rewards and group-normalised advantages, ready for the learner."""

    rollout: Rollout
    reward_names: list[str]  # [F]
    rewards_per_func: torch.Tensor  # [N, F] float32, NaN where a function returned None or failed
    rewards: torch.Tensor  # [N] weighted sum over functions (NaN treated as 0, as in TRL)
    advantages: torch.Tensor  # [N]
    metrics: dict[str, float] = field(default_factory=dict)  # reward, rewards/<fn>/mean, completions/*, ...


@dataclass
class AdapterWeights:
    """The trainable (LoRA) tensors after an optimizer step: all that moves each step on CPU."""

    version: int
    tensors: dict[str, torch.Tensor]  # peft state-dict names (adapter name stripped) -> values

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class EngineAdapter:
    """The adapter as a vLLM engine holds it, for the object store: A and B·α/r in the engine's
    dtype, back to back in `adapter_pairs` order, as one byte string (one copy off the learner's
    GPU, one object to pickle) instead of a dict of fp32 tensors."""

    version: int
    shapes: dict[str, list[int]]  # peft names -> shapes, in the order the values travel
    dtype: str  # the values' torch dtype name
    payload: bytes

    @property
    def num_bytes(self) -> int:
        return len(self.payload)


def process_info(version: int) -> dict[str, Any]:
    """What an actor's ready() reports: its pid and node (for stack dumps) and its weight version."""
    import os
    import socket

    return {"pid": os.getpid(), "node": socket.gethostname(), "version": version}


@dataclass
class StepMetrics:
    """What the learner returns to the driver each step: plain numbers and a few sample rows, no batch."""

    step: int
    version: int  # weight version after this step
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)  # a few completions with their rewards, for logs
