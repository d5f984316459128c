"""Colocated mode on one GPU (cluster=single_gpu): one copy of the base weights, adapter through CUDA IPC.

The engine runs in its own process (vLLM's EngineCore, as in a RolloutActor under Ray); this
test process plays the learner, so every tensor it shares with the engine crosses a process
boundary through CUDA IPC exactly as between the two actors. Checked:
(a) the learner's model is built on the engine's weights: no second copy in memory, and its
    logprobs equal those of the same model loaded from disk;
(b) one storage, proven: a write through the learner's view of a base weight changes what the
    engine samples;
(c) the adapter mapped once and pulled on the device each step changes the engine's outputs,
    which then match the learner's own logprobs; a deliberately stale rollout is caught;
(d) the engine frees its KV cache while "the learner trains" and takes it back to generate,
    for several cycles, without the device's memory growing.
Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

pytestmark = pytest.mark.gpu
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer may be absent
pytest.importorskip("vllm")

from grpo_ray.actors.learner import LearnerActor, SyncCheckError  # noqa: E402
from grpo_ray.actors.rollout import RolloutActor  # noqa: E402
from grpo_ray.config import load_config  # noqa: E402
from grpo_ray.models import load_model  # noqa: E402
from tests.gpu.vllm_helpers import (  # noqa: E402
    ROWS, TEMPERATURE, gaps_to_adapter_and_base, random_adapter, scored_rollout, teacher_forced_gap,
)

G, MAX_NEW = 4, 24
SYNC_TOL = 0.1  # trainer.sync_check_tolerance's default


@pytest.fixture(scope="module")
def cfg(vllm_model_dir):
    return load_config([
        f"model.name_or_path={vllm_model_dir}", "model.dtype=auto", "rollout=vllm", "cluster=single_gpu",
        f"rollout.num_generations={G}", f"rollout.temperature={TEMPERATURE}", "rollout.max_prompt_length=64",
        f"rollout.max_completion_length={MAX_NEW}", "rollout.gpu_memory_utilization=0.1",
        "trainer.per_device_train_batch_size=8", "model.lora.r=8", "model.lora.alpha=16", "trainer.lr=1e-2",
        f"rollout.enforce_eager={os.environ.get('GRPO_RAY_TEST_EAGER', 'false')}",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def engine(cfg, vllm_model_dir):
    start = time.perf_counter()
    actor = RolloutActor(cfg, str(vllm_model_dir), device="cuda")
    print(f"\ncolocated engine ready in {time.perf_counter() - start:.1f} s (sleep mode, "
          f"enforce_eager={cfg.rollout.enforce_eager})")  # fmt: skip
    yield actor
    actor.backend.close()


@pytest.fixture(scope="module")
def learner(cfg, vllm_model_dir, engine):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    learner = LearnerActor(cfg, str(vllm_model_dir), device="cuda", shared_weights=engine.share_weights())
    base_bytes = sum(p.numel() * p.element_size() for n, p in learner.model.named_parameters() if "lora_" not in n)
    grown = torch.cuda.memory_allocated() - before
    print(f"learner on the engine's weights in {time.perf_counter() - start:.2f} s: base {base_bytes / 2**20:.1f} MiB "
          f"mapped, learner allocated {grown / 2**20:.2f} MiB (its LoRA)")  # fmt: skip
    assert grown < 0.5 * base_bytes, (grown, base_bytes)  # the base is not copied; only the adapter is new
    engine.map_adapter(learner.share_adapter())
    return learner  # torn down before `engine`: the learner's views go before the engine's memory


def test_learner_on_engine_weights_equals_the_model_from_disk(engine, learner, cfg, vllm_model_dir):
    own = load_model(cfg.model, str(vllm_model_dir), "cuda")
    rollout = engine.generate(ROWS, version=0)
    with learner.model.disable_adapter():
        gap_shared = teacher_forced_gap(learner.model, rollout, engine.tokenizer.pad_token_id)
    gap_own = teacher_forced_gap(own, rollout, engine.tokenizer.pad_token_id)
    ids = torch.randint(3, own.config.vocab_size, (2, 17), device="cuda")
    with torch.no_grad(), learner.model.disable_adapter():
        same = torch.equal(learner.model(ids).logits, own(ids).logits)
    print(f"teacher-forced |engine - learner on shared weights| = {gap_shared:.4f}, |engine - own copy| = {gap_own:.4f}; "
          f"logits identical: {same}")  # fmt: skip
    assert same and gap_shared < SYNC_TOL


def test_a_write_through_the_learners_view_is_seen_by_the_engine(engine, learner):
    norm = learner.model.get_base_model().model.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.zero_()  # final hidden state 0 -> all logits 0 -> every token has logp -log(V)
    torch.cuda.synchronize()
    try:
        rollout = engine.generate(ROWS, version=0)
    finally:
        with torch.no_grad():
            norm.copy_(saved)
        torch.cuda.synchronize()
    uniform = -math.log(learner.model.get_base_model().config.vocab_size)
    logps = [x for lp in rollout.sampling_logprobs for x in lp]
    print(f"engine after zeroing the norm through the learner's view: logp in [{min(logps):.4f}, {max(logps):.4f}], "
          f"-log V = {uniform:.4f}")  # fmt: skip
    assert max(logps) - min(logps) < 1e-3 and max(logps) < uniform + 1e-3  # uniform over (at least) the vocabulary
    assert any(abs(x - uniform) > 0.1 for lp in engine.generate(ROWS, version=0).sampling_logprobs for x in lp)


def test_adapter_pulled_through_ipc_changes_the_engine_and_stale_rollouts_are_caught(engine, learner):
    pad_id = engine.tokenizer.pad_token_id
    random_adapter(learner.model, seed=1)  # in place, as the optimizer does
    stale = engine.generate(ROWS, version=0)  # the engine has not pulled it yet
    with pytest.raises(SyncCheckError, match="learner at weight version 0 and the rollout made by version 0") as caught:
        learner.train_step(scored_rollout(stale))
    print(f"stale rollout caught: {str(caught.value)[:120]}...")
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.pull_weights(0)
        times.append((time.perf_counter() - start) * 1e3)
    fresh = engine.generate(ROWS, version=0)
    gap, gap_base = gaps_to_adapter_and_base(learner.model, fresh, pad_id)
    print(f"pull_weights {min(times):.2f}-{max(times):.2f} ms; |engine - learner| = {gap:.4f}, "
          f"|engine - base| = {gap_base:.4f}")  # fmt: skip
    assert gap < SYNC_TOL and gap_base > 4 * gap
    metrics = learner.train_step(scored_rollout(fresh))  # passes the check, steps the optimizer in place
    engine.pull_weights(metrics.version)
    after = engine.generate(ROWS, version=metrics.version)
    assert teacher_forced_gap(learner.model, after, pad_id) < SYNC_TOL


def test_kv_cache_is_released_and_taken_back_without_growth(engine, learner, cfg):
    backend = engine.backend
    free_asleep, free_awake, learner_held = [], [], []
    for cycle in range(4):
        torch.cuda.synchronize()
        free_asleep.append(torch.cuda.mem_get_info()[0])
        backend.llm.wake_up()
        free_awake.append(torch.cuda.mem_get_info()[0])
        backend.llm.sleep(level=1)
        rollout = engine.generate(ROWS, version=learner.version)  # wake, generate, sleep
        learner.train_step(scored_rollout(rollout, seed=cycle))  # the learner allocates and gives back
        engine.pull_weights(learner.version)
        torch.cuda.synchronize()
        learner_held.append(torch.cuda.memory_allocated())  # this process is the learner's
    gib = 2**30
    released = [(a - w) / gib for a, w in zip(free_asleep, free_awake)]
    drift = (max(free_asleep[1:]) - min(free_asleep[1:])) / gib
    budget = cfg.rollout.gpu_memory_utilization * torch.cuda.mem_get_info()[1] / gib
    print(f"KV cache released per cycle: {[f'{r:.2f}' for r in released]} GiB (engine budget {budget:.1f} GiB); "
          f"free memory while asleep drifts {drift * 1024:.1f} MiB over cycles 2-4; wake {backend.timings}")  # fmt: skip
    assert min(released) > 0.5 * budget  # most of the engine's share is its KV cache, and it goes
    assert drift < 0.125  # no growth from cycle to cycle (128 MiB: allocator rounding)
    print(f"learner's allocated memory after each cycle: {[f'{b / 2**20:.1f}' for b in learner_held]} MiB")
    assert max(learner_held[1:]) - min(learner_held[1:]) < 2**20  # optimizer state from cycle 1 on, nothing more
