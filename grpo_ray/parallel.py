"""Data parallelism inside the learner: several learner workers share one step's rollout.

Each worker takes a contiguous range of the rollout's groups, accumulates the GRPO loss of its
completions normalised by the whole batch's counts, and the workers sum their gradients
(all-reduce) before one identical optimizer step each: the update equals a single learner's on
the whole batch. Every decision a step takes (sync check, skipping a non-finite update) is made
on values reduced over all workers, so no worker raises while the others wait in a collective.
With one worker every operation is local and no process group exists.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch


def torch_threads(cpu_threads: int, peers: int) -> int:
    """Torch CPU threads for one of `peers` actors of a kind that work at the same time (rollout
    engines, data-parallel learners): cluster.cpu_threads if set, else an equal share of the node's
    cores. Ray caps an actor's OMP threads at its num_cpus, too few for CPU training; every peer
    taking all the cores would oversubscribe them while they work at once."""
    return cpu_threads or max(1, (os.cpu_count() or 1) // peers)


def group_ranges(num_groups: int, num_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering num_groups, sizes within one of each other, none empty."""
    base, extra = divmod(num_groups, num_parts)
    ranges, start = [], 0
    for part in range(min(num_parts, num_groups)):
        stop = start + base + (part < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


class LearnerGroup:
    """This learner worker's place among `world_size` (rank 0 holds what leaves the group: weights, checkpoints)."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"learner rank {rank} is outside a group of {world_size}")
        self.rank, self.world_size = rank, world_size

    def join(self, host: str, port: int, device: torch.device) -> None:
        """Create the workers' process group: NCCL between GPUs, gloo on CPUs (rank 0 listens on host:port)."""
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world_size)

    def leave(self) -> None:
        """Tear the process group down (before the worker goes)."""
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def completions(self, num_groups: int, group_size: int) -> list[int]:
        """Indices of the completions this worker trains on: its range of groups (none when there are
        fewer groups than workers and this rank gets no range)."""
        ranges = group_ranges(num_groups, self.world_size)
        if self.rank >= len(ranges):
            return []
        start, stop = ranges[self.rank]
        return list(range(start * group_size, stop * group_size))

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of `values` over the workers (fp64, so counts stay exact)."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every trainable parameter's gradient over the workers, in place (a missing one counts as 0)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective for the whole adapter
        dist.all_reduce(flat)
        for p, part in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(part.view_as(p))

    def gather(self, item: Any, combine: Callable[[list[Any]], Any]) -> Any:
        """`combine` of every worker's `item` (small picklable data: per-worker metrics and weights)."""
        if self.world_size == 1:
            return combine([item])
        import torch.distributed as dist

        items: list[Any] = [None] * self.world_size
        dist.all_gather_object(items, item)
        return combine(items)
