"""Per-token log-probabilities of completions under a causal LM, without [tokens × V] logits.

The backbone gives hidden states; only the positions that predict a completion token are
kept and passed with the lm_head weight to a selective-logprob kernel (plain torch on CPU,
Triton on CUDA), which returns log p(token) and the entropy at the sampling temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from grpo_ray.config import ConfigError

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
    """Prompt + completion sequences laid out as model rows, with where each completion token is predicted.

    Padded (`pack`): one sequence per row, right-padded; the attention mask marks real tokens.
    Padding-free (`pack(..., padding_free=True)`): all sequences in one row, position ids restarting
    at 0 for each; the attention implementation keeps them apart (see PACKING_ATTENTION).
    """

    input_ids: torch.Tensor  # [R, S] R rows of S tokens
    attention_mask: torch.Tensor  # [R, S] 1 on real tokens (padding-free: all ones; the model gets position_ids)
    predict_index: torch.Tensor  # [n, L] flat index into the R·S positions whose hidden state predicts token j
    targets: torch.Tensor  # [n, L] completion ids, IGNORE_INDEX on padding
    completion_mask: torch.Tensor  # [n, L] float 1 on completion tokens
    position_ids: torch.Tensor | None = None  # [1, S] padding-free only

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(**{k: None if t is None else t.to(device) for k, t in vars(self).items()})

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The backbone's keyword arguments: the attention mask when padded, restarting positions when packed.

        One padded row (a micro-batch of one sequence, as long contexts use) has nothing to mask: it
        goes without a mask, so SDPA runs plain causal attention (flash / memory-efficient kernels)
        instead of being handed an [S, S] mask, 16 GiB at S = 128K.
        """
        if self.position_ids is not None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.input_ids.shape[0] == 1:
            return {"input_ids": self.input_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pack(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, padding_free: bool = False
) -> PackedBatch:
    """Concatenate each prompt with its completion; n = len(completion_ids) = len(prompt_ids).

    padding_free=False: one sequence per row, right-padded with pad_id to the longest.
    padding_free=True: one row [1, Σ lengths], each sequence's positions counting from 0.
    """
    sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
    lengths = torch.tensor([len(s) for s in sequences])
    if padding_free:
        input_ids = torch.tensor([[token for s in sequences for token in s]], dtype=torch.long)
        attention_mask = torch.ones_like(input_ids)
        position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0)
        starts = lengths.cumsum(0) - lengths  # [n] where each sequence begins in the row
    else:
        input_ids = pad_ragged(sequences, pad_id, torch.long)
        attention_mask = pad_ragged([[1] * len(s) for s in sequences], 0, torch.long)
        position_ids = None
        starts = torch.arange(len(sequences)) * input_ids.shape[1]  # [n] row i begins at i·S
    targets = pad_ragged(completion_ids, IGNORE_INDEX, torch.long)
    completion_mask = (targets != IGNORE_INDEX).float()
    prompt_len = torch.tensor([len(p) for p in prompt_ids])
    offsets = torch.arange(targets.shape[1]).unsqueeze(0)  # [1, L]
    # token j of a completion sits at start + prompt_len + j and is predicted by the position before it;
    # padding positions point at 0 (any valid index) and are masked out.
    predict_index = (starts + prompt_len - 1).unsqueeze(1) + offsets
    predict_index = torch.where(completion_mask.bool(), predict_index, torch.zeros_like(predict_index))
    return PackedBatch(input_ids, attention_mask, predict_index, targets, completion_mask, position_ids)


def micro_batch_indices(lengths: list[int], batch_size: int, max_tokens: int, padding_free: bool) -> list[list[int]]:
    """Which sequences (prompt + completion `lengths`) share a micro-batch.

    max_tokens == 0: consecutive chunks of `batch_size` (trainer.per_device_train_batch_size).
    max_tokens > 0 (trainer.max_tokens_per_microbatch): longest first, each micro-batch takes sequences
    while its token count stays <= max_tokens -- Σ lengths when padding-free, rows × longest when padded,
    which sorting keeps close to Σ lengths. A sequence longer than max_tokens goes alone.
    """
    if max_tokens == 0:
        return [list(range(s, min(s + batch_size, len(lengths)))) for s in range(0, len(lengths), batch_size)]

    def tokens(group: list[int]) -> int:
        return sum(lengths[i] for i in group) if padding_free else len(group) * max(lengths[i] for i in group)

    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and tokens(groups[-1] + [i]) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


# Attention implementations (transformers 5) that keep sequences packed into one row apart, given
# position ids that restart at 0 and no attention mask:
# * sdpa, eager: transformers finds the boundaries in position_ids (masking_utils.find_packed_sequence_indices)
#   and builds a block-diagonal causal mask. Correct, but the mask is [T, T] for a row of T tokens (bool for
#   sdpa: 256 MiB at T = 16K), so keep T small with trainer.max_tokens_per_microbatch.
# * flash_attention_2 / flash_attention_3: varlen kernels, cu_seqlens taken from position_ids (one row only,
#   which is what packing makes); no mask at all.
# * flex_attention: a block mask built from the same boundaries.
# Others (paged attention for generation, kernels registered by name) may attend across the boundaries.
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_padding_free(model: torch.nn.Module, padding_free: bool) -> None:
    """trainer.padding_free=true needs an attention implementation from PACKING_ATTENTION."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if padding_free and implementation not in PACKING_ATTENTION:
        raise ConfigError(
            f"trainer.padding_free=true packs several sequences into one row, but the model's attention "
            f"implementation {implementation!r} is not known to keep them apart; set "
            f"+model.init_kwargs.attn_implementation= one of {', '.join(PACKING_ATTENTION)}, or trainer.padding_free=false"
        )


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

    1. run the backbone for hidden states [R, S, H] (R = n rows padded, 1 row padding-free);
    2. gather the states that predict completion tokens -> [n·L, H];
    3. the kernel streams them against lm_head: log p(target) and entropy, no [n·L, V] tensor kept.
    """
    backbone, head = backbone_and_head(model)
    # no KV cache: nothing is generated, and under checkpointing a cache would keep every layer's K, V
    hidden = backbone(**batch.model_inputs(), use_cache=False).last_hidden_state  # [R, S, H]
    n, length = batch.targets.shape
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.predict_index.reshape(-1))  # [n·L, H]
    logp, entropy = kernel(selected, head, batch.targets.reshape(-1), temperature)
    return logp.view(n, length), entropy.view(n, length)
