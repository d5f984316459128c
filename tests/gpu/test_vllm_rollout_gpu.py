"""The vllm rollout backend on CUDA, on a tiny random model (one engine for the module).

(a) RolloutActor(backend=vllm) samples groups with sampling logprobs, finish reasons, stop strings;
(b) an adapter written in place into the engine's LoRA buffers changes its logprobs, which then
    match an HF + peft model with the same adapter, teacher-forced (DESIGN.md: compare
    logprobs, not greedy tokens), and a second write replaces the first;
(c) the learner's first-step sync check fails on a rollout from other weights and passes on
    one from its own, before and after a weight update.

The model is conftest's `vllm_model_dir`. Numbers are printed (``pytest -s``).
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
from grpo_ray.models import add_lora, load_model  # noqa: E402
from grpo_ray.types import AdapterWeights, Rollout  # noqa: E402
from grpo_ray.weights import export_adapter  # noqa: E402
from tests.gpu.vllm_helpers import (  # noqa: E402
    MATCH_TOL,
    ROWS,
    TEMPERATURE,
    random_adapter,
    scored_rollout,
    teacher_forced_gap,
)

G, MAX_NEW = 4, 24


@pytest.fixture(scope="module")
def model_dir(vllm_model_dir) -> Path:
    return vllm_model_dir


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
        random_adapter(hf, seed)
        weights = export_adapter(hf, version)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            actor.update_weights(weights)
            times.append((time.perf_counter() - start) * 1e3)
        rollout = actor.generate(ROWS, version=version)
        gap_lora = teacher_forced_gap(hf, rollout, pad_id)
        with hf.disable_adapter():
            gap_base = teacher_forced_gap(hf, rollout, pad_id)
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
        gap_base0 = teacher_forced_gap(hf, base_rollout, pad_id)
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
        learner.train_step(scored_rollout(actor.generate(ROWS, version=0)))
    print(f"wrong adapter caught: {str(caught.value)[:110]}...")
    # 2. the engine on the learner's weights passes the check and trains
    actor.update_weights(learner.export_weights())
    rollout = actor.generate(ROWS, version=0)
    gap0 = teacher_forced_gap(learner.model, rollout, pad_id)
    metrics = learner.train_step(scored_rollout(rollout)).metrics
    print(f"step 1 on a vLLM rollout: gap {gap0:.4f}, loss {metrics['loss']:.4f}, grad_norm {metrics['grad_norm']:.4f}")
    assert gap0 < cfg.trainer.sync_check_tolerance
    # 3. after the update the engine samples from the new adapter (version 1)
    actor.update_weights(learner.export_weights())
    rollout = actor.generate(ROWS, version=1)
    gap1 = teacher_forced_gap(learner.model, rollout, pad_id)
    with learner.model.disable_adapter():
        gap1_base = teacher_forced_gap(learner.model, rollout, pad_id)
    metrics = learner.train_step(scored_rollout(rollout, seed=1)).metrics
    print(f"step 2 on version 1: gap to the learner {gap1:.4f}, to the base {gap1_base:.4f}, loss {metrics['loss']:.4f}")
    assert gap1 < MATCH_TOL and learner.version == 2
