"""vLLM's GPU worker with grpo_ray's write paths, and its weights outside the sleep pool.

`LLM(worker_cls="grpo_ray.actors.vllm_worker.GRPOWorker")` makes the engine use it (imported in
the engine's process; this module needs vllm). Two changes to vLLM's worker:

1. the LoRA write paths of `LoRAWriterExtension` (object store, CUDA IPC, NCCL);
2. in sleep mode, only the KV cache goes into vLLM's cuMem pool. vLLM would put the weights
   there too, but cuMem (virtual memory) allocations cannot be exported through
   cudaIpcGetMemHandle, which is how the learner maps them; weights allocated by PyTorch's
   caching allocator can be. Sleeping then frees the KV cache (and PyTorch's cached blocks)
   and leaves the weights, and the LoRA buffers, where they are.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from vllm.v1.worker.gpu_worker import Worker

from grpo_ray.actors.vllm_backend import LoRAWriterExtension


class GRPOWorker(LoRAWriterExtension, Worker):
    """vLLM's Worker; see the module docstring for what differs."""

    def _maybe_get_memory_pool_context(self, tag: str) -> AbstractContextManager:
        if tag == "weights":
            return nullcontext()
        return super()._maybe_get_memory_pool_context(tag)

    def sleep(self, level: int = 1) -> None:
        super().sleep(level)
        torch.cuda.empty_cache()  # the engine's cached activation blocks go back to the device too
