"""grpo_ray.parallel: which completions a learner worker takes, and the sums over workers (gloo, 2 processes)."""

from __future__ import annotations

import pytest
import torch

from grpo_ray.parallel import LearnerGroup, torch_threads
from tests.conftest import run_ranks


def test_workers_take_contiguous_whole_groups_and_cover_the_batch():
    taken = [LearnerGroup(rank, 3).completions(num_groups=5, group_size=4) for rank in range(3)]
    assert taken == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
    assert LearnerGroup().completions(5, 4) == list(range(20))  # one worker: everything
    assert LearnerGroup(2, 3).completions(2, 4) == []  # fewer groups than workers: this one idles


def test_peers_share_the_nodes_cores_unless_threads_are_set(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert [torch_threads(0, peers) for peers in (1, 2, 3, 64)] == [32, 16, 10, 1]
    assert torch_threads(6, 2) == 6  # cluster.cpu_threads wins


def test_one_worker_reduces_nothing():
    group = LearnerGroup()
    assert group.sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    assert group.gather({"a": 1}, lambda items: items) == [{"a": 1}]
    with pytest.raises(ValueError, match="rank 2 is outside a group of 2"):
        LearnerGroup(2, 2)


def _worker(rank: int, port: int, queue) -> None:
    group = LearnerGroup(rank, 2)
    group.join("127.0.0.1", port, torch.device("cpu"))
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.full((2, 3), float(rank + 1))  # rank 1's b has no gradient: it counts as 0
    if rank == 0:
        b.grad = torch.arange(4.0)
    group.sum_gradients([a, b])
    summed = group.sum([rank + 1.0, 10.0], torch.device("cpu"))
    gathered = group.gather(rank, sorted)
    group.leave()
    queue.put((rank, a.grad.tolist(), b.grad.tolist(), summed, gathered))


def test_two_workers_sum_gradients_and_values_and_gather():
    results = sorted(run_ranks(_worker))
    assert [rank for rank, *_ in results] == [0, 1]
    for _, a, b, summed, gathered in results:
        assert a == [[3.0] * 3] * 2 and b == [0.0, 1.0, 2.0, 3.0]
        assert summed == [3.0, 20.0] and gathered == [0, 1]
