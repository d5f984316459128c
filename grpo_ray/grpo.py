"""GRPO arithmetic on per-token log-probabilities: advantages, policy losses, KL, importance sampling.

Definitions follow TRL's ``GRPOTrainer`` (``_generate_and_score_completions`` for advantages and
scoring metrics, ``_compute_loss`` for the losses), so TRL users' knobs and dashboards carry over.
Pure torch: no model, no Ray; the learner feeds it the logp that ``grpo_ray.kernels`` returns.

Shapes use the letters of ``types.py``: B prompts with G = ``num_generations`` completions each,
N = B·G completions (each prompt's G adjacent), L completion tokens, padded on the right; ``mask``
[N, L] is 1 on the tokens that count. Padded positions may hold anything (even inf): they are
zeroed before any arithmetic, so they reach neither the loss nor the gradient.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "gspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")

# TRL's vllm_importance_sampling_clip_max default (mode token_truncate: w = min(ratio, C_max)).
DEFAULT_IMPORTANCE_SAMPLING_CAP = 3.0
# TRL divides by (std + 1e-4) so that a group with equal rewards gives advantage 0, not NaN.
_STD_EPS = 1e-4


# --------------------------------------------------------------------------------------------
# Advantages and scoring-time metrics
# --------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str | bool = "group") -> Tensor:
    """A_i = (r_i − mean_group r) / (std + 1e-4); std of the group, of the batch, or none.

    Args:
        rewards: [N] float, each prompt's ``num_generations`` completions adjacent. NaN marks an
            unscorable completion (every reward function returned None): as in TRL it is left out
            of its group's mean and std and gets advantage 0.
        num_generations: G, completions per prompt; N must be a multiple of it.
        scale_rewards: "group" (GRPO, Shao et al. 2024), "batch" (PPO-Lite, Liu et al. 2025),
            "none" (Dr. GRPO, Liu et al. 2025: std scaling adds a difficulty bias);
            True / False are TRL's aliases of "group" / "none". std is unbiased (torch.std).

    Returns:
        advantages [N], same dtype as rewards.
    """
    mode = _scale_rewards_mode(scale_rewards)
    grouped = _grouped(rewards, num_generations)  # [B, G]
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if mode == "group":
        advantages = advantages / (_group_std(grouped) + _STD_EPS)
    elif mode == "batch":
        advantages = advantages / (_nanstd(grouped) + _STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0).reshape(-1)


def reward_stats(rewards: Tensor, num_generations: int) -> dict[str, float]:
    """TRL's scoring-time metrics: ``reward`` (mean), ``reward_std``, ``frac_reward_zero_std``.

    ``reward_std`` is the unbiased std of the whole batch's rewards, TRL's definition since
    PPO-Lite (huggingface/trl#3935; earlier TRL logged the mean of the per-group stds).
    ``frac_reward_zero_std`` is the fraction of groups whose std is ~0 (torch.isclose to 0):
    groups that teach nothing under "group" scaling. NaN rewards are ignored, as in TRL.
    """
    grouped = _grouped(rewards, num_generations)  # [B, G]
    group_std = _group_std(grouped)  # [B, 1]
    return {
        "reward": torch.nanmean(grouped).item(),
        "reward_std": _nanstd(grouped).item(),
        "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item(),
    }


def _scale_rewards_mode(scale_rewards: str | bool) -> str:
    """Resolve TRL's boolean aliases: True → "group", False → "none"."""
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if mode not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {SCALE_REWARDS} or True/False")
    return mode


def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    """[N] rewards → [B, G], checking that N = B·G."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of num_generations={num_generations}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards.view(-1, num_generations)


def _group_std(grouped: Tensor) -> Tensor:
    """Per-group unbiased std [B, 1]; 0 for one-completion groups (TRL's eval case G = 1)."""
    if grouped.size(1) == 1:
        return torch.zeros_like(grouped)
    return _nanstd(grouped, dim=1)


def _nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased std ignoring NaNs (TRL's nanstd): NaN where fewer than 2 values remain."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    return variance.sqrt() if dim is not None else variance.sqrt().reshape(())


# --------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    sampling_logp: Tensor | None = None,
    importance_sampling_cap: float | None = None,
    num_sequences: int | float | Tensor | None = None,
    num_tokens: int | float | Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO-family policy loss, TRL's ``GRPOTrainer._compute_loss`` on per-token logps.

    Steps:
        1. ratio r = exp(logp − old_logp): per token, or per sequence (GSPO) as exp of the
           masked mean log-ratio, kept [N, 1] and broadcast over tokens;
        2. per-token loss ℓ: PPO-clip (grpo, bnpo, dr_grpo, dapo, gspo) or CISPO (cispo);
        3. ℓ ← w·ℓ, w the truncated IS weight of the rollout engine's sampling (sampling_logp);
        4. ℓ ← ℓ + β·k3(ref ‖ π) when beta != 0 (not IS-weighted, as in TRL);
        5. reduce with the loss type's normalisation.

    Args:
        logp: [N, L] log π_θ(o_t) of the sampled tokens, with grad.
        old_logp: [N, L] log π_old (the learner's logps before this update); None = on-policy,
            logp.detach() (ratio 1, TRL's shortcut when generation and update are aligned).
        advantages: [N], one per completion (``group_advantages``).
        mask: [N, L] bool or 0/1, tokens that count.
        loss_type: one of LOSS_TYPES; "gspo" is grpo's normalisation with
            importance_sampling_level forced to "sequence" (Zheng et al. 2025; TRL spells it
            loss_type="grpo", importance_sampling_level="sequence").
        epsilon, epsilon_high: clip range [1 − ε, 1 + ε_high]; epsilon_high None → epsilon
            (DAPO recommends 0.28). For cispo epsilon_high is the ratio cap ε_max itself
            (ScaleRL recommends 5.0), again epsilon when None, as in TRL.
        delta: INTELLECT-2 two-sided clipping: r in the unclipped term is capped at delta.
        beta: KL coefficient; != 0 needs ref_logp [N, L] (reference policy's logps).
        importance_sampling_level: "token" or "sequence".
        max_completion_length: L_max of dr_grpo's denominator; None → L.
        sampling_logp: [N, L] the rollout engine's logps of the sampled tokens; when given, ℓ is
            multiplied by w = min(exp(old_logp − sampling_logp), importance_sampling_cap)
            (TRL's vllm_importance_sampling_correction, mode "token_truncate").
        importance_sampling_cap: C_max of w; None → DEFAULT_IMPORTANCE_SAMPLING_CAP (3.0, TRL's).
        num_sequences, num_tokens: for gradient accumulation, the global number of sequences
            (grpo/gspo mean, dr_grpo denominator) and of active tokens (bnpo, dapo, cispo)
            across all micro-batches, so that the micro-batch losses sum to the full-batch loss.
            None → this batch's own N and mask.sum().
        entropy: [N, L] per-token entropy, only for the ``entropy`` metric.

    Returns:
        (loss, metrics): a float32 scalar tensor, and python floats under TRL's names: ``kl`` (beta != 0),
        ``entropy`` (entropy given), ``clip_ratio/{low_mean,high_mean,region_mean,low_min,high_max}``
        (PPO-clip types) or ``cispo_clip_ratio``, and with sampling_logp
        ``sampling/importance_sampling_ratio/{mean,min,max}`` and
        ``sampling/sampling_logp_difference/{mean,max}``. Means are over active tokens
        (over sequences for sequence-level ratios, as TRL).
    """
    _check_args(**locals())  # locals() holds exactly the parameters here
    level = "sequence" if loss_type == "gspo" else importance_sampling_level
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    active = mask.bool()
    # fp32 throughout: exp() of bf16 log-ratios and bf16 token counts (3001 → 3008) are too coarse.
    logp, old_logp, ref_logp, sampling_logp = (_fp32(t) for t in (logp, old_logp, ref_logp, sampling_logp))
    advantages = advantages.float().unsqueeze(1)  # [N, 1]
    old_logp = logp.detach() if old_logp is None else old_logp
    metrics: dict[str, float] = {}

    # 1. importance ratio, [N, L] or [N, 1]
    ratio = torch.exp(_log_importance_weights(_masked(logp - old_logp, active), active, level))

    # 2. per-token loss
    if loss_type == "cispo":
        per_token_loss = _cispo_loss(ratio, advantages, _masked(logp, active), epsilon_high)
        metrics["cispo_clip_ratio"] = _masked_mean((ratio > epsilon_high) & (advantages > 0), active)
    else:
        # INTELLECT-2's delta caps r in the unclipped term; TRL's clip metrics read this capped r too.
        ratio_unclipped = ratio if delta is None else ratio.clamp(max=delta)
        per_token_loss = _ppo_clip_loss(ratio_unclipped, ratio, advantages, epsilon, epsilon_high)
        metrics.update(_clip_metrics(ratio_unclipped, advantages, active, epsilon, epsilon_high))

    # 3. truncated importance sampling of the rollout engine's sampling
    if sampling_logp is not None:
        cap = DEFAULT_IMPORTANCE_SAMPLING_CAP if importance_sampling_cap is None else importance_sampling_cap
        weight = _sampling_weight(old_logp, sampling_logp, active, cap)
        per_token_loss = per_token_loss * weight
        metrics.update(_sampling_metrics(weight, old_logp, sampling_logp, active))

    # 4. KL penalty
    if beta != 0.0:
        kl = _k3(logp, ref_logp, active)
        per_token_loss = per_token_loss + beta * kl
        metrics["kl"] = _masked_mean(kl, active)

    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, active)

    # 5. normalisation
    masked_loss = _masked(per_token_loss.expand_as(logp), active)
    loss = _NORMALISERS[loss_type](masked_loss, active, num_sequences, num_tokens, max_completion_length)
    return loss, metrics


def _fp32(t: Tensor | None) -> Tensor | None:
    """Upcast to float32 (autograd flows back to the caller's dtype)."""
    return None if t is None else t.float()


def _masked(x: Tensor, active: Tensor) -> Tensor:
    """x where active, 0 elsewhere; unlike x·mask, inf/NaN padding neither leaks nor poisons grads."""
    return torch.where(active, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _log_importance_weights(log_ratio: Tensor, active: Tensor, level: str) -> Tensor:
    """token: log r_t = log π − log π_old [N, L]; sequence (GSPO): Σ_t mask·log r_t / |o_i| [N, 1]."""
    if level == "token":
        return log_ratio
    return log_ratio.sum(-1, keepdim=True) / active.sum(-1, keepdim=True).clamp(min=1)


def _ppo_clip_loss(
    ratio_unclipped: Tensor, ratio: Tensor, advantages: Tensor, epsilon: float, epsilon_high: float
) -> Tensor:
    """PPO-clip: ℓ = −min(r·A, clip(r, 1 − ε, 1 + ε_high)·A), r of the first term capped at delta."""
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    return -torch.min(ratio_unclipped * advantages, clipped * advantages)


def _cispo_loss(ratio: Tensor, advantages: Tensor, logp: Tensor, epsilon_max: float) -> Tensor:
    """CISPO: ℓ = −sg(min(r, ε_max))·A·log π, MiniMax-M1 2025 (gradient flows through log π only)."""
    return -ratio.clamp(max=epsilon_max).detach() * advantages * logp


def _sampling_weight(old_logp: Tensor, sampling_logp: Tensor, active: Tensor, cap: float) -> Tensor:
    """Truncated IS weight w = min(exp(log π_old − log π_sampler), C_max), detached, 1 on padding."""
    return torch.exp(_masked(old_logp.detach() - sampling_logp, active)).clamp(max=cap).detach()


def _k3(logp: Tensor, ref_logp: Tensor, active: Tensor) -> Tensor:
    """k3 estimator of KL(π ‖ π_ref): exp(ref − logp) − (ref − logp) − 1 (Schulman 2020); 0 on padding."""
    log_ratio = _masked(ref_logp - logp, active)
    return torch.exp(log_ratio) - log_ratio - 1


# --------------------------------------------------------------------------------------------
# Normalisations: (masked per-token loss [N, L], active, num_sequences, num_tokens, L_max) → scalar
# --------------------------------------------------------------------------------------------


def _sequence_mean(masked_loss, active, num_sequences, num_tokens, max_completion_length) -> Tensor:
    """grpo: (1/N) Σ_i Σ_t mask·ℓ / |o_i|, Shao et al. 2024 (N = num_sequences when given)."""
    per_sequence = masked_loss.sum(-1) / active.sum(-1).clamp(min=1)
    return per_sequence.sum() / _denominator(num_sequences, active.size(0), masked_loss)


def _token_mean(masked_loss, active, num_sequences, num_tokens, max_completion_length) -> Tensor:
    """bnpo / dapo / cispo: Σ mask·ℓ / Σ mask, Yu et al. 2025 (Σ mask = num_tokens when given)."""
    return masked_loss.sum() / _denominator(num_tokens, active.sum(), masked_loss)


def _constant_length(masked_loss, active, num_sequences, num_tokens, max_completion_length) -> Tensor:
    """dr_grpo: Σ mask·ℓ / (N·L_max), Liu et al. 2025 (N = num_sequences when given)."""
    length = masked_loss.size(1) if max_completion_length is None else max_completion_length
    return masked_loss.sum() / (_denominator(num_sequences, active.size(0), masked_loss) * length)


_NORMALISERS = {
    "grpo": _sequence_mean,
    "gspo": _sequence_mean,
    "bnpo": _token_mean,
    "dapo": _token_mean,
    "cispo": _token_mean,
    "dr_grpo": _constant_length,
}


def _denominator(given: int | float | Tensor | None, local: int | Tensor, like: Tensor) -> Tensor:
    """The global count when given, else this batch's; clamped ≥ 1 as TRL does."""
    count = local if given is None else given
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp(min=1)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _masked_mean(x: Tensor, active: Tensor) -> float:
    """Mean of x over active tokens, or over sequences when x is per sequence [N, 1] (TRL)."""
    x = x.float()
    if x.size(1) == 1:
        return x.mean().item()
    return (_masked(x, active).sum() / active.sum().clamp(min=1)).item()


@torch.no_grad()
def _clip_metrics(
    ratio: Tensor, advantages: Tensor, active: Tensor, epsilon: float, epsilon_high: float
) -> dict[str, float]:
    """Fractions clipped: low = r < 1 − ε with A < 0, high = r > 1 + ε_high with A > 0, region = either."""
    low = (ratio < 1 - epsilon) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return {
        "clip_ratio/low_mean": _masked_mean(low, active),
        "clip_ratio/high_mean": _masked_mean(high, active),
        "clip_ratio/region_mean": _masked_mean(low | high, active),
        "clip_ratio/low_min": _per_sequence_fraction(low, active).min().item(),
        "clip_ratio/high_max": _per_sequence_fraction(high, active).max().item(),
    }


def _per_sequence_fraction(flags: Tensor, active: Tensor) -> Tensor:
    """Per-sequence fraction of active tokens flagged, over sequences with ≥ 1 active token."""
    flags = flags.float()
    if flags.size(1) == 1:
        return flags.squeeze(1)
    has_tokens = active.any(-1)
    if not has_tokens.any():
        return torch.zeros(1, device=flags.device)
    return (_masked(flags.expand_as(active), active).sum(-1) / active.sum(-1).clamp(min=1))[has_tokens]


@torch.no_grad()
def _sampling_metrics(weight: Tensor, old_logp: Tensor, sampling_logp: Tensor, active: Tensor) -> dict[str, float]:
    """TRL's IS diagnostics over active tokens: w's mean/min/max and |log π_old − log π_sampler|."""
    w = weight[active].float()
    gap = (old_logp - sampling_logp)[active].abs().float()
    if w.numel() == 0:  # TRL logs 0 for an empty batch
        w = gap = torch.zeros(1, device=weight.device)
    return {
        "sampling/importance_sampling_ratio/mean": w.mean().item(),
        "sampling/importance_sampling_ratio/min": w.min().item(),
        "sampling/importance_sampling_ratio/max": w.max().item(),
        "sampling/sampling_logp_difference/mean": gap.mean().item(),
        "sampling/sampling_logp_difference/max": gap.max().item(),
    }


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_args(
    logp, old_logp, advantages, mask, loss_type, epsilon, epsilon_high, delta, beta, ref_logp,
    importance_sampling_level, max_completion_length, sampling_logp, importance_sampling_cap,
    num_sequences, num_tokens, entropy,
) -> None:
    """Fail early, naming the bad knob and its valid values."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level={importance_sampling_level!r}: expected one of {IMPORTANCE_SAMPLING_LEVELS}"
        )
    if logp.dim() != 2:
        raise ValueError(f"logp must be [N, L], got shape {tuple(logp.shape)}")
    named = {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp, "sampling_logp": sampling_logp,
             "entropy": entropy}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, logp has {tuple(logp.shape)}: must match")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [N] = [{logp.size(0)}], got shape {tuple(advantages.shape)}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (the reference policy's logps); pass it or set beta=0")
    if epsilon < 0 or (epsilon_high is not None and epsilon_high < 0):
        raise ValueError(f"epsilon={epsilon}, epsilon_high={epsilon_high}: must be ≥ 0")
    if loss_type == "cispo" and (epsilon if epsilon_high is None else epsilon_high) < 1:
        warnings.warn(
            f"loss_type='cispo' caps the ratio at epsilon_high itself (ε_max, ScaleRL recommends 5.0); "
            f"epsilon_high={epsilon_high} (epsilon={epsilon} when None) scales down every token's gradient",
            stacklevel=3,
        )
    if max_completion_length is not None and max_completion_length < logp.size(1):
        raise ValueError(
            f"max_completion_length={max_completion_length} is below the completion length L={logp.size(1)}"
        )
    if importance_sampling_cap is not None and importance_sampling_cap <= 0:
        raise ValueError(f"importance_sampling_cap={importance_sampling_cap}: must be > 0 (None → 3.0)")
    for name, count in (("num_sequences", num_sequences), ("num_tokens", num_tokens)):
        if count is not None and not isinstance(count, Tensor) and count <= 0:
            raise ValueError(f"{name}={count}: must be > 0 (the global count over micro-batches) or None")
