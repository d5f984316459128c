"""LearnerActor on CPU (no Ray): micro-batches by token budget, padding-free packing and gradient
checkpointing leave a step's loss and LoRA gradients those of one pass over the whole batch.

Each loss type normalises over the whole batch (num_sequences / num_tokens of all micro-batches), so
the micro-batch losses must sum to the one-pass loss. Two iterations per rollout (μ = 2) with a large
learning rate make the second pass off-policy, so clipping and importance ratios take part too.
Gradients are read in an optimizer pre-step hook, before clipping (max_grad_norm is huge).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from grpo_ray.actors.learner import LearnerActor
from grpo_ray.config import load_config
from grpo_ray.types import Rollout, ScoredRollout

B, G = 2, 4  # prompts, generations per prompt
LOSSES = {  # loss_type -> overrides that select it
    "grpo": ["loss=grpo"],
    "bnpo": ["loss=dapo", "loss.loss_type=bnpo"],
    "dr_grpo": ["loss=dr_grpo"],
    "dapo": ["loss=dapo"],
    "gspo": ["loss=gspo"],
    "cispo": ["loss=cispo"],
}
BUDGET = 30  # tokens per micro-batch: sequences here are 4..24 tokens, so 1-3 per micro-batch


def _scored_rollout(vocab: int, seed: int = 0) -> ScoredRollout:
    """B groups of G completions with ragged lengths, random advantages and sampling logprobs near log(1/V)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    prompt_ids = [torch.randint(3, vocab, (rand(3, 10),), generator=g).tolist() for _ in range(B)]
    completion_ids = [torch.randint(3, vocab, (rand(1, 15),), generator=g).tolist() for _ in range(B * G)]
    sampling = [(-4.6 + 0.3 * torch.randn(len(c), generator=g)).tolist() for c in completion_ids]
    rollout = Rollout(
        prompts=["p"] * B, prompt_ids=prompt_ids, completion_ids=completion_ids, completions=[""] * (B * G),
        sampling_logprobs=sampling, finish_reasons=["stop"] * (B * G), columns={}, num_generations=G, version=0,
    )  # fmt: skip
    rewards = torch.zeros(B * G)
    return ScoredRollout(rollout, ["r"], rewards[:, None], rewards, torch.randn(B * G, generator=g))


def _step(model_dir, *overrides: str) -> dict:
    """One train_step with μ = 2 from the same start; the metrics, the gradients of both passes, the micro-batches."""
    cfg = load_config([
        f"model.name_or_path={model_dir}", "model.lora.r=4", f"rollout.num_generations={G}",
        "rollout.max_completion_length=16", "rollout.temperature=0.9", "loss.beta=0.04",
        f"trainer.per_device_train_batch_size={B * G}", "trainer.num_iterations=2", "trainer.lr=5e-2",
        "trainer.max_grad_norm=1e9", "trainer.sync_check_tolerance=1e9", *overrides,
    ])  # fmt: skip
    learner = LearnerActor(cfg, str(model_dir))
    gen = torch.Generator().manual_seed(1)  # B = 0 would leave A without gradient
    for name, p in sorted(learner.model.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    scored = _scored_rollout(learner.model.config.vocab_size)
    grads: list[dict[str, torch.Tensor]] = []
    learner.optimizer.register_step_pre_hook(
        lambda *_: grads.append({n: p.grad.clone() for n, p in learner.model.named_parameters() if p.requires_grad})
    )
    micro_batches = len(learner._micro_batches(scored))
    return {"metrics": learner.train_step(scored).metrics, "grads": grads, "micro_batches": micro_batches}


def _assert_same_step(got: dict, expected: dict) -> None:
    for key in ("loss", "kl", "entropy"):
        assert got["metrics"][key] == pytest.approx(expected["metrics"][key], rel=1e-5, abs=1e-7), key
    assert len(got["grads"]) == len(expected["grads"]) == 2
    for got_pass, expected_pass in zip(got["grads"], expected["grads"]):
        assert got_pass.keys() == expected_pass.keys()
        for name, grad in got_pass.items():
            torch.testing.assert_close(grad, expected_pass[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("loss_type", LOSSES)
def test_micro_batches_by_token_budget_give_the_one_pass_step(tiny_model_dir, loss_type):
    one_pass = _step(tiny_model_dir, *LOSSES[loss_type])
    assert one_pass["micro_batches"] == 1
    assert abs(one_pass["metrics"]["loss"]) > 1e-4 and all(g.abs().sum() > 0 for g in one_pass["grads"][0].values())
    for padding_free in ("false", "true"):
        split = _step(tiny_model_dir, *LOSSES[loss_type], f"trainer.max_tokens_per_microbatch={BUDGET}",
                      f"trainer.padding_free={padding_free}")  # fmt: skip
        assert split["micro_batches"] >= 3, split["micro_batches"]
        _assert_same_step(split, one_pass)


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_gradient_checkpointing_gives_the_same_step(tiny_model_dir, mode):
    budget = [f"trainer.max_tokens_per_microbatch={BUDGET}", "trainer.padding_free=true"]
    plain = _step(tiny_model_dir, *budget)
    _assert_same_step(_step(tiny_model_dir, *budget, f"trainer.gradient_checkpointing={mode}"), plain)


def test_padding_free_with_an_attention_that_may_cross_sequences_is_refused(tiny_model_dir):
    cfg = load_config([f"model.name_or_path={tiny_model_dir}", "trainer.padding_free=true",
                       "+model.init_kwargs.attn_implementation=paged|eager"])  # fmt: skip
    with pytest.raises(ValueError, match=r"trainer.padding_free=true .*'paged\|eager'"):
        LearnerActor(cfg, str(tiny_model_dir))


def test_broadcast_sends_the_current_adapter_in_the_engines_layout(tiny_model_dir):
    """cluster.weight_sync=nccl, the learner's end: buckets filled from the LoRA parameters each step."""
    from grpo_ray.weights import adapter_tensors, engine_values
    from tests.unit.test_weights import Wire

    cfg = load_config([f"model.name_or_path={tiny_model_dir}", "model.lora.r=4", "model.lora.alpha=8",
                       "model.dtype=bfloat16"])  # fmt: skip
    learner = LearnerActor(cfg, str(tiny_model_dir))
    learner.weight_group = wire = Wire()
    _, learner._buckets, learner._fill_buckets = learner._adapter_buckets(bucket_numel=1000)  # several buckets
    assert len(learner._buckets) > 1
    for step in range(2):
        with torch.no_grad():  # an optimizer step: the parameters change in place
            for p in learner.model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        learner.broadcast_weights()
        expected = engine_values(adapter_tensors(learner.model), 8 / 4, torch.bfloat16)
        assert torch.equal(torch.cat(wire.sent), torch.cat([v.reshape(-1) for v in expected]))
        wire.sent.clear()


def test_engine_layout_export_is_the_current_adapter_as_the_engine_holds_it(tiny_model_dir):
    """cluster.weight_sync=object_store to vllm engines: one byte string, A and B·α/r in adapter_pairs order."""
    from grpo_ray.weights import adapter_pairs, adapter_tensors, engine_values

    cfg = load_config([f"model.name_or_path={tiny_model_dir}", "model.lora.r=4", "model.lora.alpha=8",
                       "model.dtype=bfloat16"])  # fmt: skip
    learner = LearnerActor(cfg, str(tiny_model_dir))
    for version in (1, 2):
        with torch.no_grad():  # an optimizer step: the parameters change in place
            for p in learner.model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        learner.version = version
        exported = learner.export_engine_weights()
        tensors = adapter_tensors(learner.model)
        expected = torch.cat([v.reshape(-1) for v in engine_values(tensors, 8 / 4, torch.bfloat16)])
        got = torch.frombuffer(bytearray(exported.payload), dtype=torch.bfloat16)
        assert exported.version == version and exported.dtype == "bfloat16" and torch.equal(got, expected)
        assert list(exported.shapes) == [n for _, a, b in adapter_pairs(tensors) for n in (a, b)]
        assert all(exported.shapes[n] == list(t.shape) for n, t in tensors.items())


def test_memory_cap_resolves_the_actors_unindexed_cuda_device(monkeypatch):
    """A Ray actor's learner runs on torch.device("cuda") (CUDA_VISIBLE_DEVICES holds its one GPU);
    torch's set_per_process_memory_fraction wants an index: the cap gives it the current device's."""
    from grpo_ray.actors.learner import cap_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, index: calls.append((fraction, index)))
    cap_memory(torch.device("cuda"), 20)
    cap_memory(torch.device("cuda", 1), 40)
    assert calls == [(0.25, 3), (0.5, 1)]
    with pytest.raises(ValueError, match="learner_memory_gib=90 is more than the GPU has \\(80.0 GiB\\)"):
        cap_memory(torch.device("cuda"), 90)
