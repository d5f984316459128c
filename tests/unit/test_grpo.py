"""grpo_ray.grpo: advantages, policy losses, KL, IS correction — hand-computed values and TRL parity."""

import math

import pytest
import torch

from grpo_ray.grpo import LOSS_TYPES, group_advantages, policy_loss, reward_stats

E = math.e
TOKEN_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # PPO-clip types with their own normalisation


def _batch():
    """Two completions, L = 3; the second has 2 active tokens. A = [1, -0.5]."""
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([1.0, -0.5])
    return logp, mask, advantages


def _grad(loss, logp):
    (grad,) = torch.autograd.grad(loss, logp)
    return grad


# --------------------------------------------------------------------------------------------
# group_advantages / reward_stats
# --------------------------------------------------------------------------------------------


def test_group_scaling_divides_by_unbiased_group_std():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    # group 1: mean 0.5, unbiased std sqrt(2·0.25 / 1) = 0.70711; group 2: std 0 → advantage 0
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0]) / torch.tensor([0.70711 + 1e-4] * 2 + [1e-4] * 2)
    torch.testing.assert_close(group_advantages(rewards, 2), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(group_advantages(rewards, 2, scale_rewards=True), expected, atol=1e-4, rtol=1e-4)


def test_batch_scaling_divides_by_batch_std():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    # batch mean 0.75, unbiased var (3·0.0625 + 0.5625) / 3 = 0.25 → std 0.5; group means 0.5, 1
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0]) / (0.5 + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 2, scale_rewards="batch"), expected)


def test_no_scaling_only_centres():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    expected = torch.tensor([0.5, -0.5, 1.0, -1.0])
    torch.testing.assert_close(group_advantages(rewards, 2, scale_rewards="none"), expected)
    torch.testing.assert_close(group_advantages(rewards, 2, scale_rewards=False), expected)


def test_group_scaling_matches_torch_std_on_random_rewards():
    rewards = torch.randn(4 * 8, generator=torch.Generator().manual_seed(0))
    grouped = rewards.view(4, 8)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 8), expected.reshape(-1))


def test_unscorable_reward_is_left_out_of_the_group_and_gets_zero_advantage():
    # group [nan, 0, 3]: mean of {0, 3} = 1.5, std sqrt(2·2.25 / 1) = 2.1213
    rewards = torch.tensor([float("nan"), 0.0, 3.0])
    expected = torch.tensor([0.0, -1.5 / (2.12132 + 1e-4), 1.5 / (2.12132 + 1e-4)])
    torch.testing.assert_close(group_advantages(rewards, 3), expected, atol=1e-4, rtol=1e-4)


def test_reward_stats_match_trl():
    stats = reward_stats(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    # reward: mean 0.75; reward_std: batch std 0.5 (TRL since PPO-Lite); one group of two has std 0
    assert stats == pytest.approx({"reward": 0.75, "reward_std": 0.5, "frac_reward_zero_std": 0.5})


@pytest.mark.parametrize("fn", [group_advantages, reward_stats])
def test_batch_not_divisible_by_num_generations_names_both(fn):
    with pytest.raises(ValueError, match=r"5 entries.*num_generations=2"):
        fn(torch.zeros(5), 2)


def test_unknown_scale_rewards_lists_valid_values():
    with pytest.raises(ValueError, match=r"scale_rewards='std'.*'group', 'batch', 'none'"):
        group_advantages(torch.zeros(4), 2, scale_rewards="std")


# --------------------------------------------------------------------------------------------
# On-policy: normalisations and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        # ratio 1, ℓ = −A: [[-1, -1, -1], [0.5, 0.5, pad]]
        ("grpo", {}, (-1.0 + 0.5) / 2),  # mean over sequences of per-sequence token means
        ("gspo", {}, (-1.0 + 0.5) / 2),  # grpo normalisation
        ("bnpo", {}, (-3.0 + 1.0) / 5),  # Σ / active tokens
        ("dapo", {}, (-3.0 + 1.0) / 5),
        ("dr_grpo", {}, (-3.0 + 1.0) / (2 * 3)),  # Σ / (N·L), L_max defaults to L = 3
        ("dr_grpo", {"max_completion_length": 4}, (-3.0 + 1.0) / (2 * 4)),
        # cispo: ℓ = −1·A·logp = A (logp = −1): [[1, 1, 1], [-0.5, -0.5, pad]] → Σ = 2 over 5 tokens
        ("cispo", {"epsilon_high": 5.0}, 2.0 / 5),
    ],
)
def test_on_policy_loss_values(loss_type, kwargs, expected):
    logp, mask, advantages = _batch()
    loss, _ = policy_loss(logp, None, advantages, mask, loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected)


def test_on_policy_grpo_gradient_is_minus_advantage_over_length_over_batch():
    logp, mask, advantages = _batch()
    loss, _ = policy_loss(logp, None, advantages, mask, loss_type="grpo")
    # −A_i / |o_i| / N: −1/3/2 on the first sequence, 0.5/2/2 on the second, 0 on padding
    expected = torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0.125, 0.125, 0.0]])
    torch.testing.assert_close(_grad(loss, logp), expected)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_on_policy_token_mean_gradient_is_minus_advantage_over_tokens(loss_type):
    logp, mask, advantages = _batch()
    loss, _ = policy_loss(logp, None, advantages, mask, loss_type=loss_type, epsilon_high=5.0)
    # d(−r·A)/dlogp = −A (ratio 1); d(−sg(r)·A·logp)/dlogp = −A too; / 5 active tokens
    expected = torch.tensor([[-0.2, -0.2, -0.2], [0.1, 0.1, 0.0]])
    torch.testing.assert_close(_grad(loss, logp), expected)


def test_old_logp_none_equals_old_logp_detached():
    logp, mask, advantages = _batch()
    for loss_type in LOSS_TYPES:
        a, _ = policy_loss(logp, None, advantages, mask, loss_type=loss_type, epsilon_high=5.0)
        b, _ = policy_loss(logp, logp.detach(), advantages, mask, loss_type=loss_type, epsilon_high=5.0)
        assert a.item() == b.item()


# --------------------------------------------------------------------------------------------
# Off-policy: clipping, delta, token vs sequence level
# --------------------------------------------------------------------------------------------


def test_high_ratio_clipped_for_positive_advantage_only():
    logp, mask, advantages = _batch()
    # ratio will be [e, e, e]
    loss, metrics = policy_loss(logp, logp.detach() - 1, advantages, mask, loss_type="dapo")
    # A = 1:    −min(e, 1.2) = −1.2 (clipped, no gradient)
    # A = −0.5: −min(−0.5e, −0.6) = 0.5e (unclipped, dℓ/dlogp = −A·r = 0.5e)
    assert loss.item() == pytest.approx((3 * -1.2 + 2 * 0.5 * E) / 5)
    expected_grad = torch.tensor([[0.0, 0.0, 0.0], [0.5 * E / 5, 0.5 * E / 5, 0.0]])
    torch.testing.assert_close(_grad(loss, logp), expected_grad)
    # 3 of 5 active tokens clipped high; per sequence: high fractions [1, 0], low [0, 0]
    assert metrics["clip_ratio/high_mean"] == pytest.approx(0.6)
    assert metrics["clip_ratio/low_mean"] == 0.0
    assert metrics["clip_ratio/region_mean"] == pytest.approx(0.6)
    assert metrics["clip_ratio/high_max"] == 1.0
    assert metrics["clip_ratio/low_min"] == 0.0


def test_low_ratio_clipped_for_negative_advantage_only():
    logp, mask, advantages = _batch()
    # ratio will be [1/e, 1/e, 1/e] = 0.3679
    loss, metrics = policy_loss(logp, logp.detach() + 1, advantages, mask, loss_type="dapo")
    # A = 1:    −min(1/e, 0.8) = −1/e (unclipped, dℓ/dlogp = −A·r = −1/e)
    # A = −0.5: −min(−0.5/e, −0.4) = 0.4 (clipped, no gradient)
    assert loss.item() == pytest.approx((3 * -1 / E + 2 * 0.4) / 5)
    expected_grad = torch.tensor([[-1 / E / 5] * 3, [0.0, 0.0, 0.0]])
    torch.testing.assert_close(_grad(loss, logp), expected_grad)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(0.4)
    assert metrics["clip_ratio/high_mean"] == 0.0
    assert metrics["clip_ratio/region_mean"] == pytest.approx(0.4)
    assert metrics["clip_ratio/low_min"] == 0.0  # the first sequence has none clipped low


def test_epsilon_high_widens_the_upper_clip_only():
    logp, mask, advantages = _batch()
    # ratio e < 1 + epsilon_high = 3: the A = 1 tokens are no longer clipped, ℓ = −e, grad −e
    loss, metrics = policy_loss(logp, logp.detach() - 1, advantages, mask, loss_type="dapo", epsilon_high=2.0)
    assert loss.item() == pytest.approx((3 * -E + 2 * 0.5 * E) / 5)
    torch.testing.assert_close(_grad(loss, logp)[0], torch.full((3,), -E / 5))
    assert metrics["clip_ratio/high_mean"] == 0.0


def test_delta_caps_the_unclipped_ratio_for_negative_advantages():
    logp, mask, advantages = _batch()
    # ratio e; A = −0.5: −min(min(e, 2)·−0.5, 1.2·−0.5) = −min(−1, −0.6) = 1, and no gradient
    loss, _ = policy_loss(logp, logp.detach() - 1, advantages, mask, loss_type="dapo", delta=2.0)
    assert loss.item() == pytest.approx((3 * -1.2 + 2 * 1.0) / 5)
    torch.testing.assert_close(_grad(loss, logp), torch.zeros(2, 3))


def _varying_log_ratios():
    """Log-ratios [[0.1, −0.1, 0.3], [0.2, 0.0, pad]]: both sequences have mean 0.1."""
    logp, mask, advantages = _batch()
    old_logp = logp.detach() - torch.tensor([[0.1, -0.1, 0.3], [0.2, 0.0, 5.0]])
    return logp, old_logp, advantages, mask


def test_token_level_ratio_per_token():
    logp, old_logp, advantages, mask = _varying_log_ratios()
    loss, _ = policy_loss(logp, old_logp, advantages, mask, loss_type="grpo")
    # seq 1 (A = 1): ratios [e^.1, e^-.1, e^.3 → clipped 1.2] → ℓ = −[1.1052, 0.9048, 1.2]
    # seq 2 (A = −.5): ratios [e^.2, 1] → ℓ = [0.5·e^.2, 0.5] (−min picks the unclipped r·A)
    seq1 = -(math.exp(0.1) + math.exp(-0.1) + 1.2) / 3
    seq2 = (0.5 * math.exp(0.2) + 0.5) / 2
    assert loss.item() == pytest.approx((seq1 + seq2) / 2)


def test_sequence_level_ratio_is_exp_of_masked_mean_log_ratio():
    logp, old_logp, advantages, mask = _varying_log_ratios()
    loss, metrics = policy_loss(
        logp, old_logp, advantages, mask, loss_type="grpo", importance_sampling_level="sequence"
    )
    # ratio will be [e^.1, e^.1] per sequence (the padded 5.0 is ignored), none clipped
    r = math.exp(0.1)
    assert loss.item() == pytest.approx((-r + 0.5 * r) / 2)
    # d/dlogp_t of −A·exp(mean log r) = −A·r/|o_i|, then / N
    expected_grad = torch.tensor([[-r / 3 / 2] * 3, [0.5 * r / 2 / 2] * 2 + [0.0]])
    torch.testing.assert_close(_grad(loss, logp), expected_grad)
    assert metrics["clip_ratio/region_mean"] == 0.0


def test_sequence_level_clip_metrics_count_sequences():
    logp, mask, advantages = _batch()
    old_logp = logp.detach() - torch.tensor([[0.3, 0.3, 0.3], [0.0, 0.0, 0.0]])
    _, metrics = policy_loss(
        logp, old_logp, advantages, mask, loss_type="grpo", importance_sampling_level="sequence"
    )
    # sequence 1: r = e^.3 > 1.2 with A > 0 → clipped high; 1 of 2 sequences (TRL counts sequences)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(0.5)
    assert metrics["clip_ratio/high_max"] == 1.0


def test_gspo_is_grpo_with_sequence_level_forced():
    logp, old_logp, advantages, mask = _varying_log_ratios()
    gspo, _ = policy_loss(logp, old_logp, advantages, mask, loss_type="gspo", importance_sampling_level="token")
    grpo_seq, _ = policy_loss(
        logp, old_logp, advantages, mask, loss_type="grpo", importance_sampling_level="sequence"
    )
    assert gspo.item() == pytest.approx(grpo_seq.item())


def test_cispo_caps_the_detached_ratio_at_epsilon_high():
    logp, mask, advantages = _batch()
    # ratio e, capped at 2 whatever the sign of A: ℓ = −2·A·logp = 2·A (logp = −1)
    # → [[2, 2, 2], [-1, -1]], Σ 4 / 5; gradient −2·A: −2 and 1, / 5 tokens
    loss, metrics = policy_loss(logp, logp.detach() - 1, advantages, mask, loss_type="cispo", epsilon_high=2.0)
    assert loss.item() == pytest.approx(4 / 5)
    expected_grad = torch.tensor([[-2 / 5] * 3, [1 / 5] * 2 + [0.0]])
    torch.testing.assert_close(_grad(loss, logp), expected_grad)
    # clipped: r > 2 with A > 0 → the first sequence's 3 tokens of 5
    assert metrics == pytest.approx({"cispo_clip_ratio": 0.6})


def test_cispo_warns_when_the_cap_is_below_one():
    logp, mask, advantages = _batch()
    with pytest.warns(UserWarning, match="epsilon_high"):
        policy_loss(logp, None, advantages, mask, loss_type="cispo")


# --------------------------------------------------------------------------------------------
# KL, IS correction, masks, metrics
# --------------------------------------------------------------------------------------------


def test_kl_k3_added_with_beta():
    logp, mask, advantages = _batch()
    ref_logp = logp.detach() + math.log(2)
    # k3 = exp(ln 2) − ln 2 − 1 = 0.30685 per token; dk3/dlogp = 1 − exp(ref − logp) = −1
    k3 = 1 - math.log(2)
    loss, metrics = policy_loss(logp, None, advantages, mask, loss_type="dapo", beta=0.1, ref_logp=ref_logp)
    assert loss.item() == pytest.approx((-3.0 + 1.0) / 5 + 0.1 * k3)
    expected_grad = torch.tensor([[(-1 - 0.1) / 5] * 3, [(0.5 - 0.1) / 5] * 2 + [0.0]])
    torch.testing.assert_close(_grad(loss, logp), expected_grad)
    assert metrics["kl"] == pytest.approx(k3)


def test_kl_not_logged_with_beta_zero():
    logp, mask, advantages = _batch()
    _, metrics = policy_loss(logp, None, advantages, mask, ref_logp=logp.detach())
    assert "kl" not in metrics


def test_importance_sampling_correction_truncates_and_logs():
    logp, mask, advantages = _batch()
    raw = torch.tensor([[1.0, 2.0, 4.0], [0.5, 1.0, 1.0]])  # exp(old − sampling)
    sampling_logp = logp.detach() - raw.log()
    loss, metrics = policy_loss(logp, None, advantages, mask, sampling_logp=sampling_logp)
    # w = min(raw, 3) = [[1, 2, 3], [0.5, 1]]; ℓ = −A·w = [[-1, -2, -3], [0.25, 0.5]] → Σ −5.25 / 5
    assert loss.item() == pytest.approx(-5.25 / 5)
    torch.testing.assert_close(_grad(loss, logp), torch.tensor([[-1.0, -2.0, -3.0], [0.25, 0.5, 0.0]]) / 5)
    ln2 = math.log(2)
    assert metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(7.5 / 5)
    assert metrics["sampling/importance_sampling_ratio/min"] == pytest.approx(0.5)
    assert metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(3.0)
    # |log raw| = [0, ln 2, 2 ln 2, ln 2, 0]
    assert metrics["sampling/sampling_logp_difference/mean"] == pytest.approx(4 * ln2 / 5)
    assert metrics["sampling/sampling_logp_difference/max"] == pytest.approx(2 * ln2)


def test_importance_sampling_cap_and_kl_left_unweighted():
    logp, mask, advantages = _batch()
    sampling_logp = logp.detach() - torch.tensor([[1.0, 2.0, 4.0], [0.5, 1.0, 1.0]]).log()
    ref_logp = logp.detach() + math.log(2)
    loss, _ = policy_loss(
        logp, None, advantages, mask, sampling_logp=sampling_logp, importance_sampling_cap=2.0,
        beta=0.1, ref_logp=ref_logp,
    )
    # w = [[1, 2, 2], [0.5, 1]]: Σ −A·w = −5 + 0.75; KL is added after weighting: + 0.1·k3
    assert loss.item() == pytest.approx(-4.25 / 5 + 0.1 * (1 - math.log(2)))


def test_masked_tokens_affect_neither_loss_nor_grad():
    logp, mask, advantages = _batch()
    clean = dict(
        old_logp=logp.detach() - 0.3, ref_logp=logp.detach() + 0.2, sampling_logp=logp.detach() - 0.1,
        entropy=torch.ones(2, 3),
    )
    garbage = {k: v.clone() for k, v in clean.items()}
    for k in garbage:
        garbage[k][1, 2] = float("inf") if k != "entropy" else float("nan")
    dirty_logp = logp.detach().clone()
    dirty_logp[1, 2] = 1e4
    dirty_logp.requires_grad_(True)
    for loss_type in LOSS_TYPES:
        kwargs = dict(loss_type=loss_type, epsilon_high=5.0 if loss_type == "cispo" else None, beta=0.1)
        a, ma = policy_loss(logp, advantages=advantages, mask=mask, **clean, **kwargs)
        b, mb = policy_loss(dirty_logp, advantages=advantages, mask=mask, **garbage, **kwargs)
        assert a.item() == pytest.approx(b.item()), loss_type
        assert ma == pytest.approx(mb), loss_type
        dirty_grad = _grad(b, dirty_logp)
        torch.testing.assert_close(_grad(a, logp), dirty_grad)
        assert dirty_grad[1, 2] == 0.0


def test_entropy_metric_is_masked_mean():
    logp, mask, advantages = _batch()
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    _, metrics = policy_loss(logp, None, advantages, mask, entropy=entropy)
    assert metrics["entropy"] == pytest.approx(15.0 / 5)


def test_bf16_inputs_give_fp32_loss_and_grads_in_caller_dtype():
    logp, mask, advantages = _batch()
    logp16 = logp.detach().bfloat16().requires_grad_(True)
    loss, _ = policy_loss(logp16, None, advantages, mask, loss_type="grpo")
    assert loss.dtype == torch.float32
    assert _grad(loss, logp16).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# Gradient accumulation and TRL parity on random batches
# --------------------------------------------------------------------------------------------


def _random_batch(seed=0, n=8, length=6):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(n, length, generator=g) * 3).requires_grad_(True)
    old_logp = logp.detach() + 0.3 * torch.randn(n, length, generator=g)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).int()
    advantages = torch.randn(n, generator=g)
    ref_logp = logp.detach() + 0.2 * torch.randn(n, length, generator=g)
    sampling_logp = old_logp + 0.5 * torch.randn(n, length, generator=g)
    return logp, old_logp, advantages, mask, ref_logp, sampling_logp


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_micro_batch_losses_sum_to_full_batch_loss(loss_type, level):
    logp, old_logp, advantages, mask, ref_logp, sampling_logp = _random_batch()
    kwargs = dict(
        loss_type=loss_type, importance_sampling_level=level, beta=0.04, ref_logp=ref_logp,
        sampling_logp=sampling_logp, max_completion_length=8,
        epsilon_high=5.0 if loss_type == "cispo" else 0.28,
    )
    full, _ = policy_loss(logp, old_logp, advantages, mask, **kwargs)
    full_grad = _grad(full, logp)
    total = 0.0
    for part in (slice(0, 3), slice(3, 8)):  # uneven micro-batches
        part_kwargs = {k: v[part] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        loss, _ = policy_loss(
            logp[part], old_logp[part], advantages[part], mask[part],
            num_sequences=8, num_tokens=mask.sum(), **part_kwargs,
        )
        total = total + loss
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(_grad(total, logp), full_grad)


def _trl_loss(logp, old_logp, advantages, mask, loss_type, eps, eps_high, level, beta, ref, is_ratio, l_max):
    """TRL GRPOTrainer._compute_loss's arithmetic, transcribed line by line as an oracle."""
    mask = mask.float()
    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1)
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * adv * logp
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps_high)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    per_token_loss = per_token_loss * is_ratio
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token_loss = per_token_loss + beta * kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * l_max)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_trl_arithmetic_on_random_batch(loss_type, level):
    logp, old_logp, advantages, mask, ref_logp, sampling_logp = _random_batch(seed=1)
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    is_ratio = torch.exp((old_logp - sampling_logp) * mask).clamp(max=3.0)  # TRL token_truncate
    expected = _trl_loss(logp, old_logp, advantages, mask, loss_type, 0.2, eps_high, level, 0.04, ref_logp,
                         is_ratio, 8)
    loss, _ = policy_loss(
        logp, old_logp, advantages, mask, loss_type=loss_type, epsilon_high=eps_high, beta=0.04,
        ref_logp=ref_logp, importance_sampling_level=level, sampling_logp=sampling_logp, max_completion_length=8,
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(_grad(loss, logp), _grad(expected, logp))


# --------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "ppo"}, r"loss_type='ppo'.*'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'gspo'"),
        ({"importance_sampling_level": "seq"}, r"importance_sampling_level='seq'.*'token', 'sequence'"),
        ({"beta": 0.1}, r"beta=0.1 needs ref_logp"),
        ({"old_logp": torch.zeros(2, 4)}, r"old_logp has shape \(2, 4\), logp has \(2, 3\)"),
        ({"mask": torch.ones(3, 3)}, r"mask has shape \(3, 3\)"),
        ({"ref_logp": torch.zeros(2)}, r"ref_logp has shape \(2,\)"),
        ({"sampling_logp": torch.zeros(1, 3)}, r"sampling_logp has shape"),
        ({"entropy": torch.zeros(2, 2)}, r"entropy has shape"),
        ({"advantages": torch.zeros(2, 3)}, r"advantages must be \[N\] = \[2\]"),
        ({"max_completion_length": 2}, r"max_completion_length=2 is below .* L=3"),
        ({"epsilon": -0.1}, r"epsilon=-0.1"),
        ({"importance_sampling_cap": 0.0}, r"importance_sampling_cap=0.0"),
        ({"num_tokens": 0}, r"num_tokens=0"),
        ({"num_sequences": -1}, r"num_sequences=-1"),
    ],
)
def test_bad_arguments_name_the_knob(kwargs, match):
    logp, mask, advantages = _batch()
    args = dict(logp=logp, old_logp=None, advantages=advantages, mask=mask)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)


def test_logp_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"logp must be \[N, L\]"):
        policy_loss(torch.zeros(3), None, torch.zeros(3), torch.ones(3))
