"""Data-parallel learner on GPUs (cluster.learner_workers=2): two workers on two GPUs, gradients
summed over NCCL, take the optimizer step one learner takes on the whole batch: the same loss, the
same gradients going into AdamW, and the same parameters on both workers afterwards.

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


def _step(learner: LearnerActor) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One train step; its metrics, the gradients AdamW steps with (summed over workers) and the LoRA parameters after.

    The gradients, not the parameters, are what one learner and two must agree on: AdamW's first update
    is lr * g / (|g| + eps), about lr * sign(g), so a gradient element near zero flips by 2 * lr on a
    summation-order difference of 1e-9 (seen on the H200: loss and grad norm equal to 6 digits, a lora_A
    element not)."""
    names = {p: n for n, p in learner.model.named_parameters() if p.requires_grad}
    grads: dict[str, torch.Tensor] = {}

    def keep_grads(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads.update({names[p]: p.grad.detach().cpu().clone() for g in optimizer.param_groups for p in g["params"]})

    hook = learner.optimizer.register_step_pre_hook(keep_grads)
    metrics = learner.train_step(_scored_rollout(learner.model.config.vocab_size)).metrics
    hook.remove()
    return metrics, grads, {n: p.detach().cpu() for p, n in names.items()}


def _numpy(tensors: dict[str, torch.Tensor]) -> dict:
    """Arrays for the queue: a torch tensor on it would live in the worker's shared memory."""
    return {n: t.numpy() for n, t in tensors.items()}


def _worker(rank: int, port: int, queue, model_dir: str) -> None:
    learner = _learner(model_dir, rank, 2)
    learner.join_learner_group("127.0.0.1", port)
    metrics, grads, params = _step(learner)
    queue.put((rank, metrics["loss"], metrics["grad_norm"], _numpy(grads), _numpy(params)))
    learner.group.leave()


def test_two_gpu_workers_take_the_single_learners_step(tiny_model_dir):
    workers = sorted(run_ranks(functools.partial(_worker, model_dir=str(tiny_model_dir))), key=lambda r: r[0])
    one_metrics, one_grads, one_params = _step(_learner(str(tiny_model_dir)))
    assert len(workers) == 2 and one_metrics["grad_norm"] > 0
    scale = max(g.abs().max().item() for g in one_grads.values())
    for rank, loss, grad_norm, grads, _ in workers:
        worst = max((torch.from_numpy(grads[n]) - g).abs().max().item() for n, g in one_grads.items())
        print(f"\nworker {rank}: loss {loss:.6f} (one learner {one_metrics['loss']:.6f}), grad_norm {grad_norm:.6f} "
              f"({one_metrics['grad_norm']:.6f}), gradients max |diff| {worst:.2e} of max |grad| {scale:.2e}")  # fmt: skip
        assert loss == pytest.approx(one_metrics["loss"], rel=1e-5, abs=1e-7)
        assert grad_norm == pytest.approx(one_metrics["grad_norm"], rel=1e-4)
        for name, value in one_grads.items():
            torch.testing.assert_close(torch.from_numpy(grads[name]), value, rtol=1e-4, atol=1e-6 * scale)
    for name in one_params:  # the same summed gradient on both workers: the same update, bit for bit
        assert (workers[0][4][name] == workers[1][4][name]).all(), name
