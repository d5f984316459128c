"""Errors raised in actors that must tell the user which knob to turn."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

# What reduces memory in each phase, in the order worth trying.
MEMORY_KNOBS = {
    "learner": ("trainer.max_tokens_per_microbatch, or trainer.per_device_train_batch_size (raise "
                "trainer.gradient_accumulation_steps to keep the batch)", "trainer.gradient_checkpointing=offload",
                "model.quantization=nf4", "loss.kernel=triton (on CUDA)", "rollout.max_completion_length",
                "rollout.max_prompt_length"),
    "rollout": ("rollout.num_generations or fewer prompts per step", "rollout.max_completion_length",
                "rollout.gpu_memory_utilization or rollout.kv_cache_gib (vllm: a group that does not fit goes in "
                "waves)", "rollout.max_num_seqs (vllm)", "rollout.max_prompt_length"),
}  # fmt: skip


class OutOfMemory(RuntimeError):
    """A CUDA out-of-memory error, with the settings that lower memory in that phase."""


class EngineStartError(RuntimeError):
    """The vLLM engine did not start; the message says which of our settings set its memory and length."""


@contextmanager
def oom_advice(phase: str) -> Iterator[None]:
    """Re-raise CUDA OOM in `phase` (learner | rollout) as OutOfMemory naming the knobs."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        knobs = "; ".join(MEMORY_KNOBS[phase])
        raise OutOfMemory(f"the {phase} ran out of GPU memory ({str(e).splitlines()[0]}). Lower: {knobs}") from e
