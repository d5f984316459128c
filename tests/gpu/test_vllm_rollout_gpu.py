"""The vllm rollout backend on CUDA, on a tiny random model (one engine for the module).

(a) RolloutActor(backend=vllm) samples groups with sampling logprobs, finish reasons, stop strings;
(b) an adapter written in place into the engine's LoRA buffers changes its logprobs, which then
    match an HF + peft model with the same adapter, teacher-forced (DESIGN.md: compare
    logprobs, not greedy tokens), and a second write replaces the first;
(c) the learner's first-step sync check fails on a rollout from other weights and passes on
    one from its own, before and after a weight update.

The model is build_tiny_model's character tokenizer with a wider Llama (head_dim 64, q/k/v/o
biases, like Qwen2's qkv biases): vLLM fuses its q|k|v and gate|up exactly as for Qwen2. (A
config.json of model_type qwen2 would make transformers 5 rebuild the character tokenizer
as Qwen2Tokenizer, see offline-gpu/README.md.) Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer may be absent
pytest.importorskip("vllm")

from grpo_ray.actors.learner import LearnerActor, SyncCheckError  # noqa: E402
from grpo_ray.actors.rollout import RolloutActor  # noqa: E402
from grpo_ray.config import load_config  # noqa: E402
from grpo_ray.logprobs import completion_logprobs, pack, pad_ragged, select_kernel  # noqa: E402
from grpo_ray.models import add_lora, load_model  # noqa: E402
from grpo_ray.types import AdapterWeights, Rollout, ScoredRollout  # noqa: E402
from grpo_ray.weights import export_adapter  # noqa: E402
from tests.conftest import build_tiny_model  # noqa: E402

ROWS = [{"prompt": [{"role": "user", "content": "What is 2+2?"}], "answer": "4"},
        {"prompt": [{"role": "user", "content": "Name a colour."}], "answer": "red"}]  # fmt: skip
G, MAX_NEW, TEMPERATURE = 4, 24, 0.9
MATCH_TOL = 0.08  # mean |vLLM logp - HF logp| per token, both bf16; the learner's sync check allows 0.1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"))
    config = LlamaConfig.from_pretrained(path)
    config.update(dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, attention_bias=True, initializer_range=0.08))  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # HF zero-initialises biases; non-zero ones would show a bias mix-up
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(path)  # the engine and HF load the same bf16 values
    return path


@pytest.fixture(scope="module")
def cfg(model_dir):
    return load_config([
        f"model.name_or_path={model_dir}", "model.dtype=auto", "rollout=vllm", f"rollout.num_generations={G}",
        f"rollout.temperature={TEMPERATURE}", "rollout.max_prompt_length=64", f"rollout.max_completion_length={MAX_NEW}",
        "rollout.gpu_memory_utilization=0.3", "trainer.per_device_train_batch_size=8", "model.lora.r=8",
        "model.lora.alpha=16", "trainer.lr=1e-2", f"rollout.enforce_eager={os.environ.get('GRPO_RAY_TEST_EAGER', 'false')}",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def actor(cfg, model_dir):
    start = time.perf_counter()
    actor = RolloutActor(cfg, str(model_dir), device="cuda")
    print(f"\nengine ready in {time.perf_counter() - start:.1f} s (enforce_eager={cfg.rollout.enforce_eager})")
    yield actor
    actor.backend.close()


def _random_adapter(model, seed: int, std: float = 0.1) -> None:
    """Non-zero A and B (peft starts B at 0): the adapter visibly changes the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _teacher_forced_gap(model, rollout: Rollout, pad_id: int) -> float:
    """Mean |HF logp - rollout sampling logp| over completion tokens, at the sampling temperature."""
    g = rollout.num_generations
    batch = pack([rollout.prompt_ids[i // g] for i in range(rollout.num_completions)], rollout.completion_ids, pad_id)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, batch.to("cuda"), TEMPERATURE, select_kernel("reference", "cuda", 1024))
    sampling = pad_ragged(rollout.sampling_logprobs, 0.0, torch.float32).cuda()
    mask = batch.completion_mask.cuda()
    return (((logp - sampling).abs() * mask).sum() / mask.sum()).item()


def _scored(rollout: Rollout, seed: int = 0) -> ScoredRollout:
    advantages = torch.randn(rollout.num_completions, generator=torch.Generator().manual_seed(seed))
    rewards = torch.zeros(rollout.num_completions)
    return ScoredRollout(rollout, ["r"], rewards[:, None], rewards, advantages)


def _describe(actor, rollout: Rollout) -> str:
    lengths = [len(c) for c in rollout.completion_ids]
    return (f"lengths={lengths} reasons={Counter(rollout.finish_reasons)} "
            f"mean_logp={statistics.mean(x for lp in rollout.sampling_logprobs for x in lp):.3f} "
            f"sample={actor.tokenizer.decode(rollout.completion_ids[0])!r}")  # fmt: skip


def test_generate_groups_with_sampling_logprobs(actor):
    start = time.perf_counter()
    rollout = actor.generate(ROWS, version=0)
    print(f"generate: {time.perf_counter() - start:.2f} s, {_describe(actor, rollout)}")
    assert rollout.num_completions == len(ROWS) * G and rollout.num_generations == G and rollout.version == 0
    eos = actor.tokenizer.eos_token_id
    for ids, logps, reason in zip(rollout.completion_ids, rollout.sampling_logprobs, rollout.finish_reasons):
        assert 1 <= len(ids) <= MAX_NEW and len(logps) == len(ids)
        assert all(math.isfinite(x) and x <= 0 for x in logps)
        assert reason == ("stop" if ids[-1] == eos else "length") and eos not in ids[:-1]
    assert len({tuple(c) for c in rollout.completion_ids[:G]}) > 1  # G samples, not one repeated
    assert actor.tokenizer.decode(rollout.prompt_ids[0]).startswith("<|im_start|>user\nWhat is 2+2?")


def test_stop_strings_end_completions(actor):
    """Stop on characters the model does produce; a stopped completion ends with its stop string."""
    base = actor.generate(ROWS, version=0)
    decode = lambda ids: actor.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    chars = Counter(ch for ids in base.completion_ids for ch in decode(ids) if ch.isalnum())
    stops = [ch for ch, _ in chars.most_common(6)]
    actor.backend.cfg.stop = stops
    try:
        rollout = actor.generate(ROWS, version=0)
    finally:
        actor.backend.cfg.stop = []
    eos, by_string = actor.tokenizer.eos_token_id, 0
    for ids, logps, reason in zip(rollout.completion_ids, rollout.sampling_logprobs, rollout.finish_reasons):
        text = decode(ids)
        assert len(logps) == len(ids)
        if reason == "stop" and ids[-1] != eos:
            by_string += 1
            assert any(text.endswith(s) for s in stops) and not any(s in text[:-1] for s in stops), (text, stops)
    print(f"stop={stops}: {by_string}/{rollout.num_completions} ended by a stop string; {_describe(actor, rollout)}")
    assert by_string > 0


def test_in_place_adapter_changes_engine_and_matches_hf_peft(actor, cfg, model_dir):
    hf = add_lora(load_model(cfg.model, str(model_dir), "cuda"), cfg.model.lora).eval()
    pad_id = actor.tokenizer.pad_token_id
    base_rollout = actor.generate(ROWS, version=0)
    for version, seed in ((1, 1), (2, 2)):  # the second write must replace the first
        _random_adapter(hf, seed)
        weights = export_adapter(hf, version)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            actor.update_weights(weights)
            times.append((time.perf_counter() - start) * 1e3)
        rollout = actor.generate(ROWS, version=version)
        gap_lora = _teacher_forced_gap(hf, rollout, pad_id)
        with hf.disable_adapter():
            gap_base = _teacher_forced_gap(hf, rollout, pad_id)
        print(f"adapter v{version} ({len(weights.tensors)} tensors, {weights.num_bytes / 2**20:.2f} MiB fp32): "
              f"update_weights {min(times):.1f}-{max(times):.1f} ms; teacher-forced mean |vLLM - HF+peft| = {gap_lora:.4f}, "
              f"|vLLM - HF base| = {gap_base:.4f}; {_describe(actor, rollout)}")  # fmt: skip
        assert rollout.version == version
        assert gap_lora < MATCH_TOL, gap_lora
        assert gap_base > 0.2 and gap_base > 4 * gap_lora, (gap_base, gap_lora)
    llm, parts = actor.backend.llm, {}
    for name, call in (("reset_prefix_cache", llm.reset_prefix_cache), ("collective_rpc(grpo_lora_layout)",
                       lambda: llm.collective_rpc("grpo_lora_layout"))):  # fmt: skip
        start = time.perf_counter()
        call()
        parts[name] = f"{(time.perf_counter() - start) * 1e3:.1f} ms"
    print(f"parts of an update: {parts}")
    with hf.disable_adapter():
        gap_base0 = _teacher_forced_gap(hf, base_rollout, pad_id)
    print(f"before any write: mean |vLLM - HF base| = {gap_base0:.4f} (the registered zero adapter is the base)")
    assert gap_base0 < MATCH_TOL


def test_learner_sync_check_on_vllm_rollouts(actor, cfg, model_dir):
    learner = LearnerActor(cfg, str(model_dir), device="cuda")
    pad_id = actor.tokenizer.pad_token_id
    # 1. an engine on other weights (a stale or wrong adapter) is caught on the first step
    wrong = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) * 0.1
             for k, v in learner.export_weights().tensors.items()}  # fmt: skip
    actor.update_weights(AdapterWeights(version=0, tensors=wrong))
    with pytest.raises(SyncCheckError, match="exceeds") as caught:
        learner.train_step(_scored(actor.generate(ROWS, version=0)))
    print(f"wrong adapter caught: {str(caught.value)[:110]}...")
    # 2. the engine on the learner's weights passes the check and trains
    actor.update_weights(learner.export_weights())
    rollout = actor.generate(ROWS, version=0)
    gap0 = _teacher_forced_gap(learner.model, rollout, pad_id)
    metrics = learner.train_step(_scored(rollout)).metrics
    print(f"step 1 on a vLLM rollout: gap {gap0:.4f}, loss {metrics['loss']:.4f}, grad_norm {metrics['grad_norm']:.4f}")
    assert gap0 < cfg.trainer.sync_check_tolerance
    # 3. after the update the engine samples from the new adapter (version 1)
    actor.update_weights(learner.export_weights())
    rollout = actor.generate(ROWS, version=1)
    gap1 = _teacher_forced_gap(learner.model, rollout, pad_id)
    with learner.model.disable_adapter():
        gap1_base = _teacher_forced_gap(learner.model, rollout, pad_id)
    metrics = learner.train_step(_scored(rollout, seed=1)).metrics
    print(f"step 2 on version 1: gap to the learner {gap1:.4f}, to the base {gap1_base:.4f}, loss {metrics['loss']:.4f}")
    assert gap1 < MATCH_TOL and learner.version == 2
