"""A group that does not fit in the engine's KV cache at once is generated in waves, not an
out-of-memory crash (rollout.kv_cache_gib sets the cache to 1.5 sequences of the longest length,
the group asks for 2 prompts × 4 completions forced to full length: vLLM's scheduler preempts
and resumes). The model is conftest's `vllm_model_dir`. Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest

pytestmark = pytest.mark.gpu
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
pytest.importorskip("vllm")

from grpo_ray.actors.rollout import RolloutActor  # noqa: E402
from grpo_ray.config import load_config  # noqa: E402
from tests.gpu.vllm_helpers import ROWS, TEMPERATURE  # noqa: E402

G, PROMPT, MAX_NEW = 4, 64, 448


def test_a_group_larger_than_the_kv_cache_is_generated_in_waves(vllm_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(vllm_model_dir)
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2  # K and V, bf16
    kv_gib = 1.5 * (PROMPT + MAX_NEW) * per_token / 2**30
    cfg = load_config([
        f"model.name_or_path={vllm_model_dir}", "model.dtype=auto", "rollout=vllm", f"rollout.num_generations={G}",
        f"rollout.temperature={TEMPERATURE}", f"rollout.max_prompt_length={PROMPT}",
        f"rollout.max_completion_length={MAX_NEW}", "+rollout.generation_kwargs.ignore_eos=true",
        f"rollout.kv_cache_gib={kv_gib}", "trainer.per_device_train_batch_size=8",
        f"rollout.enforce_eager={os.environ.get('GRPO_RAY_TEST_EAGER', 'false')}",
    ])  # fmt: skip
    actor = RolloutActor(cfg, str(vllm_model_dir), device="cuda")
    try:
        start = time.perf_counter()
        rollout = actor.generate(ROWS, version=0)
        took = time.perf_counter() - start
    finally:
        actor.backend.close()
    lengths = [len(c) for c in rollout.completion_ids]
    tokens = sum(len(rollout.prompt_ids[i // G]) + n for i, n in enumerate(lengths))
    print(f"\nKV cache {kv_gib * 2**30 / per_token:.0f} tokens; the group needs {tokens}: generated in {took:.1f} s, "
          f"lengths {lengths}, reasons {Counter(rollout.finish_reasons)}")  # fmt: skip
    assert tokens > 2 * kv_gib * 2**30 / per_token  # more than twice what the cache holds at once
    assert lengths == [MAX_NEW] * len(ROWS) * G and set(rollout.finish_reasons) == {"length"}
