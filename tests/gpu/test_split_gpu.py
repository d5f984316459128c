"""Separate GPUs (cluster=split): the learner on one GPU broadcasts the adapter over NCCL, in
buckets, straight into the engine's LoRA buffers on another.

The engine runs in its own process on GPU 0 (vLLM's EngineCore), this test process is the
learner on GPU 1; both join one NCCL group as the actors do. Needs 2 GPUs. Checked: after a
broadcast the engine samples from the learner's adapter (teacher-forced logprobs match the
learner's, far from the base), for several updates and with small buckets (several broadcasts).
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.gpu
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
pytest.importorskip("vllm")
if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs (cluster=split)", allow_module_level=True)

from grpo_ray.actors.learner import LearnerActor  # noqa: E402
from grpo_ray.actors.rollout import RolloutActor  # noqa: E402
from grpo_ray.config import load_config  # noqa: E402
from tests.gpu.vllm_helpers import ROWS, TEMPERATURE, gaps_to_adapter_and_base, random_adapter  # noqa: E402

SYNC_TOL = 0.1


def _in_thread(call, *args):
    """Run a blocking call (an NCCL rendezvous or receive) beside the main thread's side of it."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", call(*args)))
    thread.start()
    return thread, out


def test_adapter_broadcast_over_nccl_reaches_the_engine(vllm_model_dir):
    cfg = load_config([
        f"model.name_or_path={vllm_model_dir}", "model.dtype=auto", "rollout=vllm", "cluster=split",
        "rollout.num_generations=4", f"rollout.temperature={TEMPERATURE}", "rollout.max_completion_length=24",
        "rollout.gpu_memory_utilization=0.1", "trainer.per_device_train_batch_size=8", "model.lora.r=8",
        "model.lora.alpha=16", "rollout.enforce_eager=true", "cluster.nccl_bucket_mb=1",
    ])  # fmt: skip
    engine = RolloutActor(cfg, str(vllm_model_dir), device="cuda")  # GPU 0
    learner = LearnerActor(cfg, str(vllm_model_dir), device="cuda:1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    thread, _ = _in_thread(engine.join_weight_group, "127.0.0.1", port, 2, learner.adapter_spec())
    learner.join_weight_group("127.0.0.1", port, 2)
    thread.join(120)
    pad_id = engine.tokenizer.pad_token_id
    try:
        for version in (1, 2):
            random_adapter(learner.model, seed=version)
            start = time.perf_counter()
            thread, _ = _in_thread(engine.receive_weights, version)
            learner.broadcast_weights()
            thread.join(120)
            took = (time.perf_counter() - start) * 1e3
            rollout = engine.generate(ROWS, version=version)
            gap, gap_base = gaps_to_adapter_and_base(learner.model, rollout, pad_id)
            print(f"\nv{version}: broadcast + receive {took:.1f} ms (1 MiB buckets); |engine - learner| = {gap:.4f}, "
                  f"|engine - base| = {gap_base:.4f}")  # fmt: skip
            assert engine.version == version and gap < SYNC_TOL and gap_base > 4 * gap
    finally:
        engine.backend.close()
