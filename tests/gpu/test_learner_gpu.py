"""LearnerActor on CUDA: a step with the Triton loss kernel equals a step with the torch reference.

A wide tiny Llama (V = 40,000 > the kernel's 32,768-column vocabulary tile, so its tile loop
runs twice with a ragged last tile; H = 256) and a hand-built ScoredRollout of ragged
completions in two micro-batches. LoRA B starts non-zero (same values in every learner),
so A gets gradients too; gradients are read in an optimizer pre-step hook, before the
update and unclipped (max_grad_norm is huge). With β > 0 the loss depends on the logps
(the on-policy ratio alone is exactly 1), so the loss is compared as well.

Checked per model dtype (the learner's `model.dtype`):
* fp32: Triton and reference agree to fp32 rounding.
* bf16: Triton and reference agree to bf16 rounding, and Triton is no further from the
  fp32 run than the bf16 reference is (Liger's test pattern, at the learner level).
Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grpo_ray.actors.learner import LearnerActor
from grpo_ray.config import load_config
from grpo_ray.types import Rollout, ScoredRollout
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.gpu

VOCAB, HIDDEN = 40_000, 256
B, G = 2, 4  # prompts, generations per prompt


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory) -> Path:
    """build_tiny_model's tokenizer and chat template; a wider Llama with a 40K vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("wide-llama"))
    config = LlamaConfig.from_pretrained(path)
    config.update(dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=HIDDEN // 4, initializer_range=0.08))  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)  # fp32 on disk; logits spread a few nats
    return path


def _scored_rollout(seed: int = 0) -> ScoredRollout:
    """B groups of G completions with ragged lengths (1..48 tokens) and random advantages."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    prompt_ids = [torch.randint(3, VOCAB, (rand(5, 20),), generator=g).tolist() for _ in range(B)]
    completion_ids = [torch.randint(3, VOCAB, (rand(1, 49),), generator=g).tolist() for _ in range(B * G)]
    rollout = Rollout(
        prompts=["p"] * B, prompt_ids=prompt_ids, completion_ids=completion_ids, completions=[""] * (B * G),
        sampling_logprobs=[[-10.0] * len(c) for c in completion_ids], finish_reasons=["stop"] * (B * G),
        columns={}, num_generations=G, version=0,
    )  # fmt: skip
    advantages = torch.randn(B * G, generator=g)
    rewards = torch.zeros(B * G)
    return ScoredRollout(rollout, ["r"], rewards[:, None], rewards, advantages)


def _learner(model_dir: Path, dtype: str, kernel: str) -> LearnerActor:
    cfg = load_config([
        f"model.name_or_path={model_dir}", f"model.dtype={dtype}", f"loss.kernel={kernel}", "model.lora.r=8",
        "loss.beta=0.04", "loss.importance_sampling_correction=false", f"rollout.num_generations={G}",
        "rollout.temperature=0.8", "rollout.max_completion_length=64", "trainer.per_device_train_batch_size=4", "trainer.max_grad_norm=1e9",
        "trainer.sync_check_tolerance=1e9", "trainer.lr=1e-3",
    ])  # fmt: skip
    learner = LearnerActor(cfg, str(model_dir), device="cuda")
    gen = torch.Generator().manual_seed(1)  # B = 0 would leave A without gradient
    for name, p in sorted(learner.model.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return learner


def _step(model_dir: Path, dtype: str, kernel: str) -> dict:
    """One train_step; returns the logps of the first micro-batch, the metrics and the LoRA grads."""
    learner = _learner(model_dir, dtype, kernel)
    base = learner.model.get_base_model()
    assert base.dtype == getattr(torch, dtype), (base.dtype, dtype)
    assert str(base.device).startswith("cuda")
    scored = _scored_rollout()
    with torch.no_grad():
        logp, entropy = learner._logprobs(learner._micro_batches(scored)[0]["batch"])
    grads: dict[str, torch.Tensor] = {}

    def capture(optimizer, args, kwargs):
        for name, p in learner.model.named_parameters():
            if p.requires_grad:
                grads[name] = p.grad.detach().float().clone()

    learner.optimizer.register_step_pre_hook(capture)
    metrics = learner.train_step(scored).metrics
    out = {"logp": logp.float(), "entropy": entropy.float(), "metrics": metrics, "grads": grads}
    del learner
    torch.cuda.empty_cache()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _grad_errors(got: dict, ref: dict) -> tuple[float, float]:
    """(relative error of all LoRA grads concatenated, worst relative error of one tensor)."""
    names = sorted(ref)
    assert sorted(got) == names and len(names) > 0
    flat_got = torch.cat([got[n].flatten() for n in names])
    flat_ref = torch.cat([ref[n].flatten() for n in names])
    worst = max(_rel(got[n], ref[n]) for n in names)
    return _rel(flat_got, flat_ref), worst


def _report(label: str, got: dict, ref: dict) -> dict[str, float]:
    mask = ref["logp"] != 0
    err = {
        "logp_max_abs": (got["logp"] - ref["logp"])[mask].abs().max().item(),
        "entropy_max_abs": (got["entropy"] - ref["entropy"])[mask].abs().max().item(),
        "loss_abs": abs(got["metrics"]["loss"] - ref["metrics"]["loss"]),
        "kl_abs": abs(got["metrics"]["kl"] - ref["metrics"]["kl"]),
    }
    err["grad_rel"], err["grad_rel_worst_tensor"] = _grad_errors(got["grads"], ref["grads"])
    print(f"{label}: " + " ".join(f"{k}={v:.2e}" for k, v in err.items()))
    return err


@pytest.fixture(scope="module")
def steps(wide_model_dir) -> dict[tuple[str, str], dict]:
    return {(d, k): _step(wide_model_dir, d, k) for d in ("float32", "bfloat16") for k in ("reference", "triton")}


def test_step_is_meaningful(steps):
    """Non-trivial values: loss and KL away from 0, every LoRA tensor (A and B) has a gradient."""
    ref = steps[("float32", "reference")]
    m = ref["metrics"]
    print("fp32 reference metrics:", {k: round(v, 5) for k, v in sorted(m.items()) if isinstance(v, float)})
    print("fp32 reference logp range:", ref["logp"][ref["logp"] != 0].min().item(), ref["logp"].max().item())
    assert abs(m["kl"]) > 1e-6 and m["grad_norm"] > 0
    grads = ref["grads"]
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    assert all(g.norm() > 0 for g in grads.values()), [n for n, g in grads.items() if g.norm() == 0][:3]


def test_fp32_triton_matches_reference(steps):
    err = _report("fp32 triton vs reference", steps[("float32", "triton")], steps[("float32", "reference")])
    assert err["logp_max_abs"] < 1e-4 and err["entropy_max_abs"] < 1e-3
    assert err["loss_abs"] < 1e-5 and err["kl_abs"] < 1e-5
    assert err["grad_rel"] < 1e-3 and err["grad_rel_worst_tensor"] < 5e-3


def test_bf16_triton_matches_reference(steps):
    triton, ref = steps[("bfloat16", "triton")], steps[("bfloat16", "reference")]
    err = _report("bf16 triton vs reference", triton, ref)
    assert err["logp_max_abs"] < 5e-2 and err["entropy_max_abs"] < 1e-1
    assert err["loss_abs"] < 1e-3 and err["kl_abs"] < 1e-3
    assert err["grad_rel"] < 5e-2


def test_bf16_triton_no_further_from_fp32_than_reference(steps):
    truth = steps[("float32", "reference")]
    e_triton = _report("bf16 triton vs fp32 reference", steps[("bfloat16", "triton")], truth)
    e_ref = _report("bf16 reference vs fp32 reference", steps[("bfloat16", "reference")], truth)
    for key in ("logp_max_abs", "grad_rel", "loss_abs"):
        assert e_triton[key] <= 2.0 * e_ref[key] + 1e-3, (key, e_triton[key], e_ref[key])


def test_learner_memory_cap_makes_going_over_an_out_of_memory_error(wide_model_dir):
    cfg = load_config([f"model.name_or_path={wide_model_dir}", "model.dtype=auto", "cluster=split",
                       "cluster.learner_memory_gib=2"])  # fmt: skip
    learner = LearnerActor(cfg, str(wide_model_dir), device="cuda")
    try:
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(3 * 2**30, dtype=torch.uint8, device="cuda")  # free on the device, but over the cap
        torch.empty(2**30, dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        del learner
