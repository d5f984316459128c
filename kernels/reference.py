"""Selective log-probabilities from hidden states in plain torch, chunked over tokens.

This is the CPU path of the learner and the oracle that the Triton kernel is tested
against. Each chunk of tokens forms its [chunk × V] logits, reduces them to the log
probability of the target token and the entropy, and is wrapped in activation
checkpointing, so neither forward nor backward ever holds more than one chunk's logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp and entropy of one chunk: hidden [n, H], weight [V, H], targets [n] -> ([n], [n]) fp32."""
    logits = (hidden @ weight.t()).float() / temperature  # [n, V]
    lse = torch.logsumexp(logits, dim=-1)  # [n]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    probs = torch.softmax(logits, dim=-1)
    entropy = lse - (probs * logits).sum(-1)
    return logp, entropy


def check_shapes(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """hidden [N, H], weight [V, H], targets [N], or a ValueError that shows the shapes given."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"expected hidden [N, H], weight [V, H], targets [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[0] != targets.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}"
        )


def selective_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token and the entropy of its distribution.

    Args:
        hidden: [N, H] last hidden states (any float dtype).
        weight: [V, H] lm_head weight (tied embeddings are fine).
        targets: [N] token ids; positions equal to ``ignore_index`` get 0 and no gradient.
        temperature: logits are divided by it before the softmax (the sampling temperature).
        chunk_size: tokens per chunk; peak extra memory is about chunk_size × V × 4 bytes × 3.

    Returns:
        (logp [N], entropy [N]), both float32 and differentiable w.r.t. hidden and weight.
    """
    check_shapes(hidden, weight, targets)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logps, entropies = [], []
    # N == 0 still runs one (empty) chunk, so the outputs stay attached to the graph.
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        args = (hidden[start : start + chunk_size], weight, safe_targets[start : start + chunk_size], temperature)
        if needs_grad:
            logp, entropy = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps) * valid
    entropy = torch.cat(entropies) * valid
    return logp, entropy
