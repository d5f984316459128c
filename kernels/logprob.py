"""Fused selective log-probabilities (and entropy) from hidden states, in Triton.

``fused_selective_logprobs(hidden, weight, targets)`` returns, per token, the
log-probability of its target under ``softmax(hidden @ weight.T / temperature)`` and
the entropy of that distribution, without ever holding the [N, V] logits: tokens are
processed in chunks of ``C`` rows whose [C, V] logits live in one scratch buffer.

Per chunk the work is split between cuBLAS (the matrix products, where it is fastest)
and Triton (everything that streams over the vocabulary):

1. ``X = h_c @ W.T`` (cuBLAS, in the input dtype, as the reference does).
2. ``_logprob_fwd_kernel`` streams over each row of ``X`` in vocabulary tiles with an
   online log-sum-exp in fp32: lse, logp and entropy per token.

What forward keeps for backward depends on what needs a gradient (decided in forward):

* **precompute** -- hidden trainable, lm_head frozen, entropy without gradient (the GRPO
  case under LoRA: entropy is a metric). The hint of issue 5: with p = softmax(z),
  ``dlogp/dh = (w_t - sum_j p_j w_j) / T``, and ``sum_j p_j w_j = P @ W`` is accumulated
  during forward (flash attention with queries = hidden, keys = values = lm_head rows):
  the row kernel writes P over X, and ``G1 = W[t] - P @ W`` ([N, H], input dtype) is
  kept. Backward is one elementwise pass ``dh = g_logp * G1 / T`` written over G1.
  2 matrix products in all, no recomputation.
* **recompute** -- the entropy needs a gradient, or the lm_head is trainable. Forward
  keeps only lse and entropy ([N] fp32); backward recomputes each chunk's logits, turns
  them into dL/dz in place (``_logprob_bwd_logits_kernel``, both upstream gradients
  folded in), then ``dh = dz @ W`` and, only if the weight is trainable,
  ``dW += dz.T @ h`` (fp32 accumulation). 3 products (4 with dW). Precomputing the
  entropy direction ``(P * (log P + H)) @ W`` as well would also be 3 products but needs
  a second [N, H] buffer and smaller chunks (slower GEMMs) to stay in the memory target;
  measured slower on the H100 (docs/BENCHMARKS.md).
* **stats** -- nothing trainable: forward only, 1 product.

Positions whose target equals ``ignore_index`` get logp = entropy = 0 and no gradient.
Structure (after Liger's ``ops/cross_entropy.py``): tuned constants, the ``@triton.jit``
kernels, host launchers that check and prepare inputs, then the ``autograd.Function``.
On machines without CUDA the module imports; the kernels run only on CUDA tensors or
under ``TRITON_INTERPRET=1`` (how the CPU tests run them).
"""

from __future__ import annotations

import math

import torch

from grpo_ray.kernels.reference import check_shapes

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dev/gpu dependency
    HAS_TRITON = False

# ---------------------------------------------------------------------------------------
# Tuned constants: H100 80GB HBM3, torch 2.11 + triton 3.6, N=20480, H=4096, V=128256,
# bf16 (scripts/bench_logprob.py --sweep; results in docs/BENCHMARKS.md).
# ---------------------------------------------------------------------------------------
# Bytes of [C, V] logits scratch: 256 MiB is C = 1024 rows at V = 128256 in bf16. Each
# chunk re-reads all of W, so cuBLAS needs C >= ~1024 to run [C, H] x [H, V] and
# [C, V] x [V, H] near its peak: C = 512 was 11% slower end to end, C = 256 25% slower
# per product; C = 2048 gained nothing and costs 0.25 GiB more. At N = 20K the peak is
# 0.40 GiB above the inputs: scratch + G1 (precompute) or scratch + dh (recompute).
SCRATCH_BYTES = 256 * 1024 * 1024
MIN_CHUNK, MAX_CHUNK = 128, 8192  # chunk rows: a multiple of MIN_CHUNK within these
# Row kernels (forward stats/probabilities, backward dz): each program streams whole
# rows in tiles of BLOCK_V elements. PROGRAMS_PER_SM > 0 makes the grid persistent (that
# many programs per SM, looping over rows): with 1 program of 32 warps per SM the rows in
# flight (132 x 256 KiB) fit in L2, so the second pass over a row (writing P) mostly
# re-reads L2: probabilities pass 5.8 -> 4.9 ms and dz pass 4.0 -> 3.7 ms at N = 20K.
# 0 launches one program per row. Tiles of 4096 ... 32768 otherwise changed nothing.
FWD_BLOCK_V = 32768
FWD_NUM_WARPS = 32
PROGRAMS_PER_SM = 1
# Elementwise kernel over [N, H] (hidden gradient in precompute mode).
ELEM_BLOCK = 4096
ELEM_NUM_WARPS = 8

# In the kernels, 1.4426950408889634 = log2(e) and 0.6931471805599453 = ln(2): the online
# log-sum-exp runs in log2 units so that it can use exp2.

if HAS_TRITON:

    @triton.jit
    def _logprob_fwd_kernel(
        logits_ptr,
        stride_logits,
        targets_ptr,
        logp_ptr,
        entropy_ptr,
        lse_ptr,
        n_rows,
        V,
        inv_temperature,
        ignore_index,
        BLOCK_V: tl.constexpr,
        WRITE_PROBS: tl.constexpr,
    ):
        """Per-row log-sum-exp, target log-probability and entropy of one chunk's logits.

        Grid: (n_programs,); program i handles rows i, i + n_programs, ... (one row each
        when n_programs == n_rows). Each row is streamed in BLOCK_V tiles with an online
        log-sum-exp (running max m, s = sum e^(z-m), t = sum e^(z-m) (z-m) for the
        entropy), all in fp32, in log2 units so that the loop uses exp2.

        Pointers:
            logits_ptr: [n_rows, V] raw logits h @ W.T in the input dtype (row stride
                stride_logits, unit column stride). Overwritten with the probabilities
                softmax(logits / T) (same dtype) when WRITE_PROBS.
            targets_ptr: [n_rows] int64 target ids (ignore_index allowed).
            logp_ptr, entropy_ptr: [n_rows] fp32 outputs, 0 where target == ignore_index.
            lse_ptr: [n_rows] fp32 log-sum-exp of logits / T (every row).
        Scalars: n_rows, V (vocabulary size), inv_temperature (1 / T), ignore_index.
        Constexprs: BLOCK_V (vocabulary tile, power of 2), WRITE_PROBS (second pass over
            the row that writes the probabilities over the logits).
        """
        offs = tl.arange(0, BLOCK_V)
        scale = inv_temperature * 1.4426950408889634  # logits / T in log2 units
        for row64 in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            row_ptr = logits_ptr + row64 * stride_logits
            target = tl.load(targets_ptr + row64)
            valid = target != ignore_index
            safe_target = tl.where(valid, target, 0)

            m = -float("inf")
            s = 0.0
            t = 0.0
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
                z2 = x * scale
                m_new = tl.maximum(m, tl.max(z2, 0))
                alpha = tl.exp2(m - m_new)
                d = tl.where(mask, z2 - m_new, 0.0)  # masked lanes: d = 0, e = 0
                e = tl.where(mask, tl.exp2(d), 0.0)
                # Rescale t to the new max; on the first tile s == 0 and m == -inf, so
                # the shift is taken as 0 (no -inf * 0).
                shift = s * tl.where(s > 0.0, m - m_new, 0.0)
                t = alpha * (t + shift) + tl.sum(e * d, 0)
                s = alpha * s + tl.sum(e, 0)
                m = m_new

            log_s = tl.log(s)
            lse = m * 0.6931471805599453 + log_s
            entropy = log_s - 0.6931471805599453 * t / s  # lse - sum p z
            z_target = tl.load(row_ptr + safe_target).to(tl.float32) * inv_temperature
            tl.store(lse_ptr + row64, lse)
            tl.store(logp_ptr + row64, tl.where(valid, z_target - lse, 0.0))
            tl.store(entropy_ptr + row64, tl.where(valid, entropy, 0.0))

            if WRITE_PROBS:
                lse2 = lse * 1.4426950408889634
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    mask = cols < V
                    x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    p = tl.exp2(x * scale - lse2)
                    tl.store(row_ptr + cols, p.to(logits_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _logprob_bwd_logits_kernel(
        logits_ptr,
        stride_logits,
        targets_ptr,
        lse_ptr,
        entropy_ptr,
        grad_logp_ptr,
        grad_entropy_ptr,
        n_rows,
        V,
        inv_temperature,
        ignore_index,
        BLOCK_V: tl.constexpr,
        HAS_GRAD_LOGP: tl.constexpr,
        HAS_GRAD_ENTROPY: tl.constexpr,
    ):
        """In place: raw logits -> dL/d(raw logits) of one chunk (recompute backward).

        With z = logits / T, p = softmax(z), log p = z - lse:
            dL/dz_j = g_logp (1[j == t] - p_j) - g_entropy p_j (log p_j + H)
        and dL/d(raw logit) = dL/dz / T. Rows with target == ignore_index get 0.
        Grid: (n_programs,); program i handles rows i, i + n_programs, ...
        Pointers:
            logits_ptr: [n_rows, V] raw logits in the input dtype (row stride
                stride_logits, unit column stride), overwritten with the gradient.
            targets_ptr: [n_rows] int64 targets; lse_ptr, entropy_ptr: [n_rows] fp32 from
                forward; grad_logp_ptr, grad_entropy_ptr: [n_rows] fp32 upstream
                gradients (read only when HAS_GRAD_LOGP / HAS_GRAD_ENTROPY).
        Scalars: n_rows, V, inv_temperature (1 / T), ignore_index.
        Constexprs: BLOCK_V (tile, power of 2), HAS_GRAD_LOGP, HAS_GRAD_ENTROPY.
        """
        offs = tl.arange(0, BLOCK_V)
        scale = inv_temperature * 1.4426950408889634
        for row64 in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            row_ptr = logits_ptr + row64 * stride_logits
            target = tl.load(targets_ptr + row64)
            # Per-row coefficients; 0 for ignored rows, so their dz is 0.
            row_scale = tl.where(target != ignore_index, inv_temperature, 0.0)
            lse2 = tl.load(lse_ptr + row64) * 1.4426950408889634
            c_logp = 0.0
            c_ent = 0.0
            h = 0.0
            if HAS_GRAD_LOGP:
                c_logp = tl.load(grad_logp_ptr + row64) * row_scale
            if HAS_GRAD_ENTROPY:
                c_ent = tl.load(grad_entropy_ptr + row64) * row_scale
                h = tl.load(entropy_ptr + row64)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                d2 = x * scale - lse2  # log2 p
                p = tl.exp2(d2)
                dz = -c_logp * p
                if HAS_GRAD_LOGP:
                    dz += tl.where(cols == target, c_logp, 0.0)
                if HAS_GRAD_ENTROPY:
                    dz -= c_ent * p * (d2 * 0.6931471805599453 + h)
                tl.store(row_ptr + cols, dz.to(logits_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _hidden_grad_kernel(
        g1_ptr,
        out_ptr,
        targets_ptr,
        grad_logp_ptr,
        H,
        inv_temperature,
        ignore_index,
        BLOCK_H: tl.constexpr,
    ):
        """dh = g_logp * G1 / T per row (precompute backward).

        Grid: (N, cdiv(H, BLOCK_H)). Both [N, H] buffers are contiguous (row stride H).
        Pointers:
            g1_ptr: [N, H] W[t] - P @ W (input dtype).
            out_ptr: [N, H] hidden gradient (input dtype); may alias g1_ptr.
            targets_ptr: [N] int64 targets (rows equal to ignore_index get 0).
            grad_logp_ptr: [N] fp32 upstream gradient of logp.
        Scalars: H, inv_temperature (1 / T), ignore_index. Constexprs: BLOCK_H.
        """
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = cols < H
        offs = row * H + cols
        target = tl.load(targets_ptr + row)
        coef = tl.load(grad_logp_ptr + row) * tl.where(target != ignore_index, inv_temperature, 0.0)
        g1 = tl.load(g1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (coef * g1).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SM_COUNT: dict = {}


def _interpreted() -> bool:
    """True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1)."""
    return HAS_TRITON and type(_logprob_fwd_kernel).__name__ == "InterpretedFunction"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _row_grid(n_rows: int, device: torch.device) -> tuple[int]:
    """One program per row, or a persistent grid of PROGRAMS_PER_SM per SM (1 SM off CUDA)."""
    if PROGRAMS_PER_SM <= 0:
        return (n_rows,)
    if device not in _SM_COUNT:
        cuda = device.type == "cuda"
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 1
    return (max(1, min(n_rows, PROGRAMS_PER_SM * _SM_COUNT[device])),)


def _chunk_rows(n: int, v: int, element_size: int, scratch_bytes: int) -> int:
    rows = scratch_bytes // max(1, v * element_size)
    rows = max(MIN_CHUNK, min(MAX_CHUNK, rows // MIN_CHUNK * MIN_CHUNK))
    return max(1, min(rows, n))


def _check_inputs(hidden, weight, targets, temperature):
    if not HAS_TRITON:
        raise RuntimeError("fused_selective_logprobs needs triton; use grpo_ray.kernels.reference")
    check_shapes(hidden, weight, targets)
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden and weight must share one of {_FLOAT_DTYPES}; got {hidden.dtype}, {weight.dtype}"
        )
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int32 or int64, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"inputs on different devices: {hidden.device}, {weight.device}, {targets.device}")
    if hidden.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            "fused_selective_logprobs runs on CUDA tensors (or under TRITON_INTERPRET=1); "
            "on CPU use grpo_ray.kernels.reference.selective_logprobs"
        )
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def _prepare(hidden, weight, targets, ignore_index):
    """Layouts the kernels and cuBLAS accept without copies of W; int64 targets."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    # cuBLAS takes W row- or column-major; anything else (a strided view) is copied once.
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        weight = weight.contiguous()
    targets = targets.to(torch.int64).contiguous()
    V = weight.shape[0]
    if targets.numel() > 0:
        bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
        if bool(bad.any()):  # one host sync per call
            raise ValueError(f"targets must be in [0, {V}) or equal ignore_index={ignore_index}")
    return hidden, weight, targets


def _launch_fwd_rows(x, targets_c, logp_c, ent_c, lse_c, inv_t, ignore_index, write_probs):
    n, V = x.shape
    _logprob_fwd_kernel[_row_grid(n, x.device)](
        x, x.stride(0), targets_c, logp_c, ent_c, lse_c, n, V, inv_t, ignore_index,
        BLOCK_V=min(FWD_BLOCK_V, _next_pow2(V)), WRITE_PROBS=write_probs, num_warps=FWD_NUM_WARPS,
    )


def _launch_bwd_rows(x, targets_c, lse_c, ent_c, grad_logp_c, grad_entropy_c, inv_t, ignore_index):
    n, V = x.shape
    _logprob_bwd_logits_kernel[_row_grid(n, x.device)](
        x, x.stride(0), targets_c, lse_c, ent_c,
        grad_logp_c if grad_logp_c is not None else lse_c,
        grad_entropy_c if grad_entropy_c is not None else lse_c,
        n, V, inv_t, ignore_index,
        BLOCK_V=min(FWD_BLOCK_V, _next_pow2(V)), HAS_GRAD_LOGP=grad_logp_c is not None,
        HAS_GRAD_ENTROPY=grad_entropy_c is not None, num_warps=FWD_NUM_WARPS,
    )


def _forward(hidden, weight, targets, temperature, ignore_index, precompute):
    """Chunked forward: logp, entropy, lse ([N] fp32) and, if precompute, G1 [N, H].

    Rows with target == ignore_index have logp = entropy = 0; their gradients are masked
    in backward, so the entropy read there does not matter.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    inv_t = 1.0 / float(temperature)
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    entropy = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    g1 = torch.empty(N, H, dtype=hidden.dtype, device=dev) if precompute else None
    if N == 0:
        return logp, entropy, lse, g1
    chunk = _chunk_rows(N, V, hidden.element_size(), SCRATCH_BYTES)
    x_buf = torch.empty(chunk, V, dtype=hidden.dtype, device=dev)
    w_t = weight.t()
    safe_targets = targets.masked_fill(targets == ignore_index, 0) if precompute else None
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        x = x_buf[: e - s]
        torch.mm(hidden[s:e], w_t, out=x)
        _launch_fwd_rows(x, targets[s:e], logp[s:e], entropy[s:e], lse[s:e], inv_t, ignore_index, precompute)
        if precompute:
            # x now holds P: G1 = W[t] - P @ W (fp32 epilogue in cuBLAS, one rounding).
            g1_c = g1[s:e]
            torch.index_select(weight, 0, safe_targets[s:e], out=g1_c)
            g1_c.addmm_(x, weight, alpha=-1.0)
    return logp, entropy, lse, g1


def _accumulate_weight_grad(acc, dz, h):
    """acc += dz.T @ h with fp32 accumulation (acc is fp32 or the weight dtype)."""
    if acc.dtype == dz.dtype:
        acc.addmm_(dz.t(), h)
        return
    if acc.is_cuda:
        try:  # cuBLAS with bf16/fp16 inputs and an fp32 C/D (torch >= 2.8)
            torch.addmm(acc, dz.t(), h, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    acc += torch.mm(dz.t(), h).to(acc.dtype)


def _backward_recompute(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, inv_t, ignore_index,
                        need_dh, need_dw):
    N, H = hidden.shape
    V = weight.shape[0]
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(V, H, dtype=torch.float32, device=weight.device) if need_dw else None
    if N > 0 and (grad_logp is not None or grad_entropy is not None):
        chunk = _chunk_rows(N, V, hidden.element_size(), SCRATCH_BYTES)
        x_buf = torch.empty(chunk, V, dtype=hidden.dtype, device=hidden.device)
        w_t = weight.t()
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            x = x_buf[: e - s]
            torch.mm(hidden[s:e], w_t, out=x)
            _launch_bwd_rows(
                x, targets[s:e], lse[s:e], entropy[s:e],
                grad_logp[s:e] if grad_logp is not None else None,
                grad_entropy[s:e] if grad_entropy is not None else None,
                inv_t, ignore_index,
            )
            if need_dh:
                torch.mm(x, weight, out=dh[s:e])
            if need_dw:
                _accumulate_weight_grad(dw, x, hidden[s:e])
    elif need_dh:
        dh.zero_()
    if dw is not None:
        dw = dw.to(weight.dtype)
    return dh, dw


class FusedSelectiveLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper; see ``fused_selective_logprobs`` for the contract."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, entropy_grad, need_dh, need_dw):
        hidden_c, weight_c, targets_c = _prepare(hidden, weight, targets, ignore_index)
        precompute = need_dh and not need_dw and not entropy_grad
        logp, entropy, lse, g1 = _forward(hidden_c, weight_c, targets_c, temperature, ignore_index, precompute)
        ctx.precompute = precompute
        ctx.need_dh, ctx.need_dw = need_dh, need_dw
        ctx.inv_t = 1.0 / float(temperature)
        ctx.ignore_index = ignore_index
        ctx.entropy_grad = entropy_grad
        if precompute:
            ctx.save_for_backward(targets_c)
            # Held on ctx, not saved, so that backward can drop it and write dh over it.
            ctx.g1 = g1
        else:
            ctx.save_for_backward(hidden_c, weight_c, targets_c, lse, entropy)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        none6 = (None,) * 6
        if not ctx.entropy_grad:
            grad_entropy = None
        if grad_logp is not None:
            grad_logp = grad_logp.float().contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float().contiguous()
        if not ctx.precompute:
            hidden, weight, targets, lse, entropy = ctx.saved_tensors
            dh, dw = _backward_recompute(
                hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, ctx.inv_t,
                ctx.ignore_index, ctx.need_dh, ctx.need_dw,
            )
            return (dh, dw) + none6
        (targets,) = ctx.saved_tensors
        g1 = ctx.g1
        if g1 is None:
            raise RuntimeError(
                "fused_selective_logprobs: backward ran twice through the same graph; with a "
                "frozen weight and entropy_grad=False the hidden gradient is written over the "
                "buffer kept from forward (call the function again instead of retain_graph)"
            )
        ctx.g1 = None
        if grad_logp is None:
            return (None, None) + none6
        N, H = g1.shape
        if N > 0:
            block_h = min(ELEM_BLOCK, _next_pow2(H))
            _hidden_grad_kernel[(N, triton.cdiv(H, block_h))](
                g1, g1, targets, grad_logp, H, ctx.inv_t, ctx.ignore_index,
                BLOCK_H=block_h, num_warps=ELEM_NUM_WARPS,
            )
        return (g1, None) + none6


def fused_selective_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = True,
    ignore_index: int = -100,
    *,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each target token and the entropy of its distribution (fused).

    Same values as ``grpo_ray.kernels.reference.selective_logprobs`` without [N, V]
    logits in memory.

    Args:
        hidden: [N, H] last hidden states, bf16 / fp16 / fp32, CUDA (or CPU under
            TRITON_INTERPRET=1). Any strides; a non-unit last stride is copied.
        weight: [V, H] lm_head weight, same dtype (tied embeddings are fine). Gradients
            w.r.t. it are computed only when ``weight.requires_grad``.
        targets: [N] int32/int64 token ids in [0, V) or ``ignore_index``.
        temperature: logits are divided by it before the softmax.
        return_entropy: if False, entropy is returned as None (and gets no gradient).
        ignore_index: positions with this target get logp = entropy = 0 and no gradient.
        entropy_grad: keyword-only. If False, entropy is returned as a metric without a
            gradient; with a frozen lm_head the hidden gradient is then precomputed in
            forward (2 [N,H]x[H,V] products in all instead of 3).

    Returns:
        (logp [N], entropy [N] or None), float32.
    """
    _check_inputs(hidden, weight, targets, temperature)
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    entropy_grad = bool(entropy_grad and return_entropy)
    if not (need_dh or need_dw):
        hidden_c, weight_c, targets_c = _prepare(hidden, weight, targets, ignore_index)
        logp, entropy, _, _ = _forward(hidden_c, weight_c, targets_c, temperature, ignore_index, False)
    else:
        logp, entropy = FusedSelectiveLogprobsFunction.apply(
            hidden, weight, targets, float(temperature), int(ignore_index), entropy_grad, need_dh, need_dw
        )
    return logp, (entropy if return_entropy else None)
