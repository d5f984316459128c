"""Data-parallel learner on GPUs (cluster.learner_workers=2): two workers on two GPUs, gradients
summed over NCCL, take the optimizer step one learner takes on the whole batch.

Each worker is a spawned process (as each is a Ray actor) with a LearnerActor on its own GPU; the
reference is one LearnerActor on GPU 0 in this process. fp32 model, so the comparison is tight
(summation order aside). Needs 2 GPUs.
"""

from __future__ import annotations

import functools

import pytest
import torch

from grpo_ray.actors.learner import LearnerActor
from grpo_ray.config import load_config
from tests.conftest import run_ranks
from tests.integration.test_learner import _scored_rollout

pytestmark = pytest.mark.gpu
if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs (cluster.learner_workers=2)", allow_module_level=True)


def _learner(model_dir: str, rank: int = 0, world_size: int = 1) -> LearnerActor:
    cfg = load_config([
        f"model.name_or_path={model_dir}", "model.dtype=float32", "model.lora.r=4", "rollout.num_generations=4",
        "trainer.per_device_train_batch_size=8", "loss.beta=0.04", "trainer.lr=1e-2", "trainer.max_grad_norm=1e9",
        "trainer.sync_check_tolerance=1e9", "cluster=split", f"cluster.learner_workers={world_size}",
    ])  # fmt: skip
    learner = LearnerActor(cfg, model_dir, device=f"cuda:{rank}", rank=rank, world_size=world_size)
    gen = torch.Generator().manual_seed(1)  # B = 0 would leave A without gradient: the same B in every learner
    for name, p in sorted(learner.model.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return learner


def _step(learner: LearnerActor) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    metrics = learner.train_step(_scored_rollout(learner.model.config.vocab_size)).metrics
    return metrics, {n: p.detach().cpu() for n, p in learner.model.named_parameters() if p.requires_grad}


def _worker(rank: int, port: int, queue, model_dir: str) -> None:
    learner = _learner(model_dir, rank, 2)
    learner.join_learner_group("127.0.0.1", port)
    metrics, params = _step(learner)  # numpy: a torch tensor on the queue would live in this process's shared memory
    queue.put((rank, metrics["loss"], metrics["grad_norm"], {n: t.numpy() for n, t in params.items()}))
    learner.group.leave()


def test_two_gpu_workers_take_the_single_learners_step(tiny_model_dir):
    workers = sorted(run_ranks(functools.partial(_worker, model_dir=str(tiny_model_dir))), key=lambda r: r[0])
    one_metrics, one_params = _step(_learner(str(tiny_model_dir)))
    assert len(workers) == 2
    for rank, loss, grad_norm, params in workers:
        print(f"\nworker {rank}: loss {loss:.6f} (one learner {one_metrics['loss']:.6f}), grad_norm {grad_norm:.6f} "
              f"({one_metrics['grad_norm']:.6f})")  # fmt: skip
        assert loss == pytest.approx(one_metrics["loss"], rel=1e-5, abs=1e-7)
        assert grad_norm == pytest.approx(one_metrics["grad_norm"], rel=1e-4)
        for name, value in one_params.items():
            torch.testing.assert_close(torch.from_numpy(params[name]), value, rtol=1e-4, atol=1e-6, msg=name)
    assert one_metrics["grad_norm"] > 0 and all((workers[0][3][n] == workers[1][3][n]).all() for n in one_params)
