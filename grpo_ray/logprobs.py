"""Per-token log-probabilities of completions under a causal LM, without [tokens × V] logits.

The backbone gives hidden states; only the positions that predict a completion token are
kept and passed with the lm_head weight to a selective-logprob kernel (plain torch on CPU,
Triton on CUDA), which returns log p(token) and the entropy at the sampling temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

IGNORE_INDEX = -100
LogprobKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def pad_ragged(rows: list[list], value: float | int, dtype: torch.dtype) -> torch.Tensor:
    """[n][len_i] ragged lists -> [n, max len] tensor padded on the right with `value`."""
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


@dataclass
class PackedBatch:
    """Prompt + completion sequences, right-padded, with where each completion token is predicted."""

    input_ids: torch.Tensor  # [n, S]
    attention_mask: torch.Tensor  # [n, S]
    predict_index: torch.Tensor  # [n, L] position in the sequence whose hidden state predicts token j
    targets: torch.Tensor  # [n, L] completion ids, IGNORE_INDEX on padding
    completion_mask: torch.Tensor  # [n, L] float 1 on completion tokens

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in vars(self).values()))


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> PackedBatch:
    """Concatenate each prompt with its completion; n = len(completion_ids) = len(prompt_ids)."""
    sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
    input_ids = pad_ragged(sequences, pad_id, torch.long)
    attention_mask = pad_ragged([[1] * len(s) for s in sequences], 0, torch.long)
    targets = pad_ragged(completion_ids, IGNORE_INDEX, torch.long)
    completion_mask = (targets != IGNORE_INDEX).float()
    prompt_len = torch.tensor([len(p) for p in prompt_ids]).unsqueeze(1)  # [n, 1]
    offsets = torch.arange(targets.shape[1]).unsqueeze(0)  # [1, L]
    # token j of a completion sits at prompt_len + j and is predicted by position prompt_len + j - 1;
    # padding positions are clamped into range and masked out.
    predict_index = (prompt_len - 1 + offsets).clamp(max=max(input_ids.shape[1] - 1, 0))
    return PackedBatch(input_ids, attention_mask, predict_index, targets, completion_mask)


def reference_kernel(chunk_size: int) -> LogprobKernel:
    from grpo_ray.kernels.reference import selective_logprobs

    return lambda h, w, t, temp: selective_logprobs(h, w, t, temp, chunk_size=chunk_size, ignore_index=IGNORE_INDEX)


def triton_kernel() -> LogprobKernel:
    from grpo_ray.kernels.logprob import fused_selective_logprobs

    # entropy is a metric here (detached in the loss): its gradient path would cost a third matmul
    return lambda h, w, t, temp: fused_selective_logprobs(h, w, t, temp, ignore_index=IGNORE_INDEX, entropy_grad=False)


def select_kernel(name: str, device: torch.device | str, chunk_size: int) -> LogprobKernel:
    """loss.kernel: `auto` is Triton on CUDA and the chunked torch reference elsewhere."""
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" else "reference"
    return triton_kernel() if name == "triton" else reference_kernel(chunk_size)


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor]:
    """The decoder stack (hidden states out) and the lm_head weight [V, H] of a (peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings().weight


def completion_logprobs(
    model: torch.nn.Module, batch: PackedBatch, temperature: float, kernel: LogprobKernel
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy), both [n, L] fp32 and 0 on padding, of each completion token at `temperature`.

    1. run the backbone for hidden states [n, S, H];
    2. gather the states that predict completion tokens -> [n·L, H];
    3. the kernel streams them against lm_head: log p(target) and entropy, no [n·L, V] tensor kept.
    """
    backbone, head = backbone_and_head(model)
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    n, length = batch.targets.shape
    index = batch.predict_index.unsqueeze(-1).expand(n, length, hidden.shape[-1])
    selected = hidden.gather(1, index).reshape(n * length, -1)
    logp, entropy = kernel(selected, head, batch.targets.reshape(-1), temperature)
    return logp.view(n, length), entropy.view(n, length)
