"""What the vLLM GPU tests share: prompts, adapters with visible effect, teacher-forced gaps."""

from __future__ import annotations

import torch

from grpo_ray.logprobs import completion_logprobs, pack, pad_ragged, select_kernel
from grpo_ray.types import Rollout, ScoredRollout

ROWS = [{"prompt": [{"role": "user", "content": "What is 2+2?"}], "answer": "4"},
        {"prompt": [{"role": "user", "content": "Name a colour."}], "answer": "red"}]  # fmt: skip
TEMPERATURE = 0.9
MATCH_TOL = 0.08  # mean |vLLM logp - HF logp| per token, both bf16; the learner's sync check allows 0.1


def random_adapter(model, seed: int, std: float = 0.1) -> None:
    """Non-zero A and B (peft starts B at 0): the adapter visibly changes the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def teacher_forced_gap(model, rollout: Rollout, pad_id: int) -> float:
    """Mean |HF logp - rollout sampling logp| over completion tokens, at the sampling temperature."""
    g = rollout.num_generations
    batch = pack([rollout.prompt_ids[i // g] for i in range(rollout.num_completions)], rollout.completion_ids, pad_id)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, batch.to("cuda"), TEMPERATURE, select_kernel("reference", "cuda", 1024))
    sampling = pad_ragged(rollout.sampling_logprobs, 0.0, torch.float32).cuda()
    mask = batch.completion_mask.cuda()
    return (((logp - sampling).abs() * mask).sum() / mask.sum()).item()


def gaps_to_adapter_and_base(model, rollout: Rollout, pad_id: int) -> tuple[float, float]:
    """`teacher_forced_gap` of a peft model with its adapter, and with it disabled (the base)."""
    gap = teacher_forced_gap(model, rollout, pad_id)
    with model.disable_adapter():
        return gap, teacher_forced_gap(model, rollout, pad_id)


def scored_rollout(rollout: Rollout, seed: int = 0) -> ScoredRollout:
    advantages = torch.randn(rollout.num_completions, generator=torch.Generator().manual_seed(seed))
    rewards = torch.zeros(rollout.num_completions)
    return ScoredRollout(rollout, ["r"], rewards[:, None], rewards, advantages)
