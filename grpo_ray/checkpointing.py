"""Activation checkpointing per decoder layer (trainer.gradient_checkpointing), optionally offloaded to host memory.

* ``off``: autograd keeps every activation of every layer: memory ~ layers × tokens × (many × H).
* ``on``: each decoder layer runs under non-reentrant ``torch.utils.checkpoint``: only its input
  [tokens, H] is kept and the layer is recomputed in backward: layers × tokens × H, plus one
  layer's working set.
* ``offload``: as ``on``, but the kept inputs wait in pinned host memory: at most two of them
  are on the device at any time, so activation memory no longer grows with the number of layers.

How ``offload`` works: non-reentrant checkpoint stores the layer's input as an autograd saved
tensor (``_CheckpointFrame.save_inputs``) and replaces everything saved inside the layer with
placeholders that its own, innermost, hooks manage. So a ``saved_tensors_hooks`` context around
the checkpoint call sees exactly one tensor per layer, the input, and that is what it moves:

1. pack (forward, layer i starts): keep layer i's input where it is, and start copying layer
   i-1's input to pinned host memory on a side CUDA stream, then drop the device copy. One layer
   late, so the last layer's input, which backward needs first, never leaves the device.
2. unpack (backward, when checkpoint recomputes layer i): make sure layer i's input is on its way
   back, start prefetching layer i-1's on the side stream (it lands while layer i recomputes and
   runs its backward), and make the compute stream wait only for layer i's copy.

On a machine without CUDA the same path runs and the host copy degenerates to a plain copy, so
the CPU tests exercise it. Gradients flow through the original forward graph either way: the
placeholders only change where saved tensors live, not what is computed.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("off", "on", "offload")
MLP_NAMES = ("mlp", "feed_forward")  # a decoder layer's MLP attribute in transformers' models
LayerFn = Callable[[torch.Tensor], torch.Tensor]


def apply_gradient_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Checkpoint every decoder layer of `model` (a causal LM, peft-wrapped or not) as trainer.gradient_checkpointing says.

    Layers run unchanged without grad (no backward will replay them). Call once, after add_lora.
    """
    if mode not in MODES:
        raise ValueError(f"trainer.gradient_checkpointing={mode!r}; choose one of {', '.join(MODES)}")
    if mode == "off":
        return
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"trainer.gradient_checkpointing={mode}: {type(model).__name__} has no decoder layers that transformers "
            "can checkpoint (GradientCheckpointingLayer); set trainer.gradient_checkpointing=off"
        )
    run = _Offloader().checkpoint if mode == "offload" else _recompute
    for index, layer in enumerate(layers):
        layer.forward = _checkpointed(layer.forward, run, index)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model, in forward order (LlamaDecoderLayer, Qwen2DecoderLayer, ...)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointed(forward: Callable, run: Callable[[int, LayerFn, torch.Tensor], torch.Tensor], index: int) -> Callable:
    """`forward` of decoder layer `index`, with its hidden-state input checkpointed by `run` when grad is on."""

    @functools.wraps(forward)
    def layer_forward(hidden_states: torch.Tensor, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(hidden_states, *args, **kwargs)
        return run(index, lambda h: forward(h, *args, **kwargs), hidden_states)

    return layer_forward


def _recompute(index: int, fn: LayerFn, hidden_states: torch.Tensor) -> torch.Tensor:
    """`on`: plain non-reentrant checkpoint (the input stays where it is)."""
    return checkpoint(fn, hidden_states, use_reentrant=False)


class _Parked:
    """One layer's input: on the device while its layer runs, then in host memory until backward fetches it."""

    def __init__(self, index: int, tensor: torch.Tensor, previous: _Parked | None) -> None:
        self.index = index
        self.device = tensor.device
        self.on_device: torch.Tensor | None = tensor.detach()  # the device copy, when there is one
        self.host: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None  # set when a copy back to the device is in flight
        self.previous = previous  # the layer before, whose input backward needs next


class _Offloader:
    """Moves checkpointed layer inputs to pinned host memory and back on a side stream (see the module docstring)."""

    def __init__(self) -> None:
        self._last: weakref.ref[_Parked] | None = None  # weak: a finished backward frees the whole chain
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def checkpoint(self, index: int, fn: LayerFn, hidden_states: torch.Tensor) -> torch.Tensor:
        """`offload`: non-reentrant checkpoint whose one saved tensor, the layer input, goes through pack/unpack."""
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, index), self._unpack):
            return checkpoint(fn, hidden_states, use_reentrant=False)

    def _pack(self, index: int, tensor: torch.Tensor) -> _Parked:
        """Forward, layer `index` starts: park its input; the previous layer's input leaves the device now."""
        last = self._last() if self._last is not None else None
        previous = last if last is not None and last.index == index - 1 else None  # index 0: a new forward pass
        parked = _Parked(index, tensor, previous)
        if previous is not None:
            self._to_host(previous)
        self._last = weakref.ref(parked)
        return parked

    def _unpack(self, parked: _Parked) -> torch.Tensor:
        """Backward, layer `index` is recomputed: its input (prefetched by now), and the layer before's on its way."""
        self._to_device(parked)
        if parked.previous is not None:
            self._to_device(parked.previous)
        if parked.ready is not None:
            torch.cuda.current_stream(parked.device).wait_event(parked.ready)
            parked.ready = None
        tensor = parked.on_device
        if parked.host is not None:  # the host copy stays, for a second backward through the same graph
            parked.on_device = None
        return tensor

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _to_host(self, parked: _Parked) -> None:
        """Copy the device tensor to (pinned) host memory and let the device copy go."""
        source = parked.on_device
        if source.is_cuda:
            stream = self._side_stream(source.device)
            stream.wait_stream(torch.cuda.current_stream(source.device))  # the layer that wrote it is queued there
            with torch.cuda.stream(stream):
                parked.host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
                parked.host.copy_(source, non_blocking=True)
            source.record_stream(stream)  # the allocator must not reuse its memory before the copy has read it
        else:
            parked.host = source.clone()
        parked.on_device = None

    def _to_device(self, parked: _Parked) -> None:
        """Start copying the host tensor back, unless it is on the device or on its way already."""
        if parked.on_device is not None:
            return
        if parked.device.type != "cuda":
            parked.on_device = parked.host
            return
        stream = self._side_stream(parked.device)
        # Allocated on the compute stream, whose queued kernels may still use this memory's last owner:
        # the side stream waits for them before writing.
        target = torch.empty(parked.host.shape, dtype=parked.host.dtype, device=parked.device)
        stream.wait_stream(torch.cuda.current_stream(parked.device))
        with torch.cuda.stream(stream):
            target.copy_(parked.host, non_blocking=True)
            parked.ready = stream.record_event()
        parked.on_device = target


# --- token-wise parts of a layer in sequence chunks (trainer.sequence_chunk_tokens) ---------


def apply_sequence_chunking(model: torch.nn.Module, chunk_tokens: int) -> None:
    """Run every decoder layer's MLP and norms over at most `chunk_tokens` tokens at a time (0: unchanged).

    The MLP's intermediate activations ([tokens × intermediate], 3 of them for a gated MLP: 3.5×
    the hidden size for Llama-3.1-8B) dominate a layer's working set on long sequences, and an
    RMSNorm keeps an fp32 copy of its input (two bf16 hidden vectors a token). Autograd keeps only
    the module's input; backward recomputes and differentiates one chunk at a time, so the peak is
    chunk_tokens × width, whatever the sequence length. These modules treat tokens independently,
    so the result is the same as in one pass; attention still sees the whole sequence.
    """
    if chunk_tokens == 0:
        return
    layers = decoder_layers(model)
    mlps = [getattr(layer, name) for layer in layers for name in MLP_NAMES if hasattr(layer, name)]
    if not mlps:
        raise ValueError(
            f"trainer.sequence_chunk_tokens={chunk_tokens}: {type(model).__name__} has no decoder-layer MLPs "
            f"(attributes {', '.join(MLP_NAMES)}) to run in chunks; set trainer.sequence_chunk_tokens=0"
        )
    norms = [child for layer in layers for child in layer.children() if type(child).__name__.endswith("Norm")]
    for module in mlps + norms:
        module.forward = _chunked(module, module.forward, chunk_tokens)


def _chunked(module: torch.nn.Module, forward: LayerFn, chunk_tokens: int) -> LayerFn:
    """`forward` of token-wise `module` over [..., tokens, H] in pieces of `chunk_tokens` flattened tokens."""

    @functools.wraps(forward)
    def chunked_forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= chunk_tokens:
            return forward(x)
        params = [p for p in module.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        if params or (torch.is_grad_enabled() and x.requires_grad):
            kept = _KeepInput.apply(flat)
            out = _InChunks.apply(kept, kept.grad_fn, forward, chunk_tokens, *params)
        else:  # nothing to differentiate
            out = _run_in_chunks(forward, flat, chunk_tokens)
        return out.view(*x.shape[:-1], -1)

    return chunked_forward


class _KeepInput(torch.autograd.Function):
    """Identity that saves its input for _InChunks' backward, before _InChunks computes anything.

    The order is the point: a decoder layer's checkpoint, recomputing the layer in backward, stops as
    soon as it has re-saved everything the layer saved (torch's early stop). Saved here, ahead of
    the chunks' forward, the input is the last thing the layer saves, so that recomputation stops
    before running the MLP again; _InChunks' backward runs it once more, chunk by chunk.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _InChunks(torch.autograd.Function):
    """`forward` over `x` in chunks without a graph; backward recomputes and differentiates chunk by chunk.

    `x` comes back in backward from `keeper` (the _KeepInput node that saved it), or from this node
    when x needs no gradient (no keeper then). RNG and autocast state are replayed as in forward.
    """

    @staticmethod
    def forward(ctx, x, keeper, forward, chunk_tokens, *params):
        # the parameters are the module's own, alive anyway: an attribute, not saved tensors (which
        # would make the layer's recomputation run this forward to re-save them)
        ctx.keeper, ctx.forward, ctx.chunk_tokens, ctx.params = keeper, forward, chunk_tokens, params
        ctx.save_for_backward(*([] if keeper is not None else [x]))
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        return _run_in_chunks(forward, x, chunk_tokens)

    @staticmethod
    def backward(ctx, grad_out):
        x, params = (ctx.keeper if ctx.keeper is not None else ctx).saved_tensors[0], ctx.params
        want_x = ctx.needs_input_grad[0]
        grad_x, grad_params = (torch.empty_like(x) if want_x else None), [None] * len(params)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.set_rng_state(ctx.rng[0])
            if x.is_cuda:
                torch.cuda.set_rng_state(ctx.rng[1], x.device)
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                for start in range(0, x.shape[0], ctx.chunk_tokens):
                    rows = slice(start, start + ctx.chunk_tokens)
                    piece = x[rows].detach().requires_grad_(want_x)
                    inputs = ([piece] if want_x else []) + list(params)
                    grads = torch.autograd.grad(ctx.forward(piece), inputs, grad_out[rows], allow_unused=True)
                    if want_x:
                        grad_x[rows] = grads[0]
                    grad_params = [_add(acc, g) for acc, g in zip(grad_params, grads[want_x:])]
        return grad_x, None, None, None, *grad_params


def _run_in_chunks(forward: LayerFn, x: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """`forward` over the rows of `x`, `chunk_tokens` at a time, into one output filled as the chunks
    come (torch.cat of a list would hold the chunks' outputs beside the whole)."""
    out = None
    for start in range(0, x.shape[0], chunk_tokens):
        y = forward(x[start : start + chunk_tokens])
        out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
        out[start : start + y.shape[0]] = y
    return out


def _add(total: torch.Tensor | None, grad: torch.Tensor | None) -> torch.Tensor | None:
    """A running sum of per-chunk gradients, where a chunk may give none."""
    return grad if total is None else total if grad is None else total + grad
