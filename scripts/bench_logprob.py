#!/usr/bin/env python
"""Benchmark selective log-probabilities: forward + backward w.r.t. hidden, and peak memory.

Rows, side by side in one run (issue 5):
  naive     full [N, V] logits, log_softmax in fp32, gather, entropy from the same tensor
  chunked   grpo_ray.kernels.reference (chunks of 1024 tokens, activation checkpointing)
  compiled  the reference's per-chunk function under torch.compile (Unsloth's approach)
  liger     Liger's fused linear cross entropy (logp only, reduction="sum"), if importable
  ours      grpo_ray.kernels.logprob.fused_selective_logprobs
and a plain torch.matmul [N, H] x [H, V] in the same run for the TFLOP/s ceiling.

Loss modes: "logp" = sum(a * logp) (entropy, if any, only a metric);
"logp+ent" = sum(a * logp) + sum(b * entropy), both with gradients.
Frozen lm_head (gradient w.r.t. hidden only), bf16 inputs, temperature 1.

Prints one JSON object per result line (stdout), then a Markdown table.
Memory is the peak of torch.cuda.max_memory_allocated above what was allocated before
the call (inputs: hidden, weight, targets, a, b), the returned hidden gradient included.
TFLOP/s counts 4*N*H*V (the two [N,H]x[H,V] products any method needs: logits and dh).

  PYTHONPATH=. python scripts/bench_logprob.py --n 4096 20480 163840
  PYTHONPATH=. python scripts/bench_logprob.py --sweep --n 20480   # tune ours only
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time

import torch

from grpo_ray.kernels import logprob as fused_mod
from grpo_ray.kernels import reference as ref_mod

GIB = 2**30


def log(obj):
    print(json.dumps(obj), flush=True)


# ------------------------------------------------------------------------------------------
# Methods: each returns (logp, entropy or None) with autograd.
# ------------------------------------------------------------------------------------------
def naive(hidden, weight, targets):
    logits = hidden @ weight.t()
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != -100
    safe = torch.where(valid, targets, 0)
    logp = logprobs.gather(-1, safe[:, None]).squeeze(-1) * valid
    entropy = -(logprobs.exp() * logprobs).sum(-1) * valid
    return logp, entropy


def chunked(hidden, weight, targets):
    return ref_mod.selective_logprobs(hidden, weight, targets, chunk_size=1024)


_compiled_chunk = None


def compiled(hidden, weight, targets):
    """The reference's loop with its per-chunk function compiled (checkpointed chunks)."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(ref_mod._chunk_logprobs, dynamic=False)
    orig = ref_mod._chunk_logprobs
    ref_mod._chunk_logprobs = _compiled_chunk
    try:
        return ref_mod.selective_logprobs(hidden, weight, targets, chunk_size=1024)
    finally:
        ref_mod._chunk_logprobs = orig


def make_liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as exc:  # noqa: BLE001
        return None, f"liger-kernel not importable: {type(exc).__name__}: {exc}"

    def liger(hidden, weight, targets):
        loss = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum")
        return -loss, None  # summed logp: the "logp" loss with a = 1

    return liger, None


def ours_logp(hidden, weight, targets):
    return fused_mod.fused_selective_logprobs(hidden, weight, targets, entropy_grad=False)


def ours(hidden, weight, targets):
    return fused_mod.fused_selective_logprobs(hidden, weight, targets)


# ------------------------------------------------------------------------------------------
def make_inputs(n, h, v, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=g) * (2.5 / h**0.5)).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[torch.rand(n, device="cuda", generator=g) < 0.05] = -100
    a = torch.randn(n, device="cuda", generator=g)
    b = torch.randn(n, device="cuda", generator=g) * 0.01
    return hidden.requires_grad_(True), weight, targets, a, b


def step(fn, hidden, weight, targets, a, b, mode):
    hidden.grad = None
    logp, entropy = fn(hidden, weight, targets)
    if fn.__name__ == "liger":
        loss = logp
    else:
        loss = (logp * a).sum()
        if mode == "logp+ent":
            loss = loss + (entropy * b).sum()
    loss.backward()


def measure(fn, inputs, mode, reps, warmup):
    hidden, weight, targets, a, b = inputs
    for _ in range(warmup):
        step(fn, hidden, weight, targets, a, b, mode)
    torch.cuda.synchronize()
    # Memory: one clean step from a state holding only the inputs.
    hidden.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, hidden, weight, targets, a, b, mode)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(fn, hidden, weight, targets, a, b, mode)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    hidden.grad = None
    return statistics.median(times), min(times), peak


def matmul_rate(n, h, v, reps=10):
    """Plain bf16 torch.matmul [n, H] x [H, V] on random data: ms and TFLOP/s."""
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(v, h, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, v, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(x, w.t(), out=out)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.matmul(x, w.t(), out=out)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    ms = statistics.median(times)
    del x, w, out
    torch.cuda.empty_cache()
    return ms, 2 * n * h * v / ms / 1e9


def free():
    gc.collect()
    torch.cuda.empty_cache()


def header():
    props = torch.cuda.get_device_properties(0)
    import triton

    info = {
        "kind": "env", "device": props.name, "sms": props.multi_processor_count,
        "gpu_mem_gib": round(props.total_memory / GIB, 1), "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        info["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001
        try:
            import liger_kernel

            info["liger_kernel"] = getattr(liger_kernel, "__version__", "importable")
        except Exception:  # noqa: BLE001
            info["liger_kernel"] = None
    return info


def run_bench(args):
    log(header())
    h, v = args.hidden, args.vocab
    liger, liger_note = make_liger()
    if liger_note:
        log({"kind": "note", "method": "liger", "note": liger_note})
    methods = [
        ("naive", naive, "logp+ent"),
        ("chunked", chunked, "logp+ent"),
        ("compiled", compiled, "logp+ent"),
        ("liger", liger, "logp"),
        ("ours", ours_logp, "logp"),
        ("ours", ours, "logp+ent"),
    ]
    if args.methods:
        methods = [m for m in methods if m[0] in args.methods]
    rows = []
    for n in args.n:
        mm_n = min(n, 20480)
        mm_ms, mm_tflops = matmul_rate(mm_n, h, v)
        mm_ms_n = mm_ms * n / mm_n
        log({"kind": "matmul", "N": n, "H": h, "V": v, "ms_one_product": round(mm_ms_n, 2), "tflops": round(mm_tflops, 1)})
        rows.append({"method": "torch.matmul (1 product)", "mode": "-", "N": n, "ms": mm_ms_n, "peak_gib": None,
                     "tflops": mm_tflops, "x_matmul": 1.0})
        inputs = make_inputs(n, h, v)
        check = None
        for name, fn, mode in methods:
            if fn is None:
                rows.append({"method": name, "mode": mode, "N": n, "ms": None, "note": liger_note})
                continue
            reps = args.reps if n <= 32768 else max(2, args.reps // 3)
            warmup = 2 if name == "compiled" else 1
            t0 = time.time()
            try:
                ms, ms_min, peak = measure(fn, inputs, mode, reps, warmup)
                status = "ok"
            except torch.cuda.OutOfMemoryError:
                ms = ms_min = peak = None
                status = "OOM"
            except Exception as exc:  # noqa: BLE001
                ms = ms_min = peak = None
                status = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            inputs[0].grad = None
            free()
            rec = {"kind": "result", "method": name, "mode": mode, "N": n, "H": h, "V": v, "status": status,
                   "ms": None if ms is None else round(ms, 2), "ms_min": None if ms_min is None else round(ms_min, 2),
                   "peak_gib_above_inputs": None if peak is None else round(peak / GIB, 3),
                   "wall_s": round(time.time() - t0, 1)}
            if ms is not None:
                rec["tflops"] = round(4 * n * h * v / ms / 1e9, 1)
                rec["x_matmul"] = round(ms / mm_ms_n, 2)
            log(rec)
            rows.append({"method": name, "mode": mode, "N": n, "ms": ms, "peak_gib": None if peak is None else peak / GIB,
                         "tflops": rec.get("tflops"), "x_matmul": rec.get("x_matmul"), "note": None if status == "ok" else status})
        # Agreement of ours with the chunked reference on these inputs (values only).
        if n <= 20480:
            with torch.no_grad():
                r = ref_mod.selective_logprobs(inputs[0], inputs[1], inputs[2])
                o = fused_mod.fused_selective_logprobs(inputs[0], inputs[1], inputs[2])
            check = {"kind": "check", "N": n, "max_abs_logp": (r[0] - o[0]).abs().max().item(),
                     "max_abs_entropy": (r[1] - o[1]).abs().max().item()}
            log(check)
        del inputs
        free()
    print_table(rows)


def print_table(rows):
    print("\n| method | loss grads | N | fwd+bwd ms | peak GiB above inputs | TFLOP/s (4NHV/t) | × one matmul | note |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ms = "-" if r.get("ms") is None else f"{r['ms']:.1f}"
        pk = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        tf = "-" if r.get("tflops") is None else f"{r['tflops']:.0f}"
        xm = "-" if r.get("x_matmul") is None else f"{r['x_matmul']:.2f}"
        print(f"| {r['method']} | {r['mode']} | {r['N']} | {ms} | {pk} | {tf} | {xm} | {r.get('note') or ''} |")


# ------------------------------------------------------------------------------------------
# Tuning: ours only, several constant settings, plus a per-stage breakdown of one chunk.
# ------------------------------------------------------------------------------------------
def breakdown(n, h, v, chunk):
    """Time each stage of one chunk (forward and recompute backward), scaled to N rows."""
    hidden, weight, targets, a, b = make_inputs(chunk, h, v, seed=1)
    hidden = hidden.detach()
    x = torch.empty(chunk, v, device="cuda", dtype=torch.bfloat16)
    logp = torch.empty(chunk, device="cuda")
    ent, lse = torch.empty_like(logp), torch.empty_like(logp)
    g1 = torch.empty(chunk, h, device="cuda", dtype=torch.bfloat16)
    safe = targets.clamp_min(0)

    def t(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / reps

    def logits():
        torch.mm(hidden, weight.t(), out=x)

    def fwd_probs():
        logits()
        fused_mod._launch_fwd_rows(x, targets, logp, ent, lse, 1.0, -100, True)

    def bwd_dz():
        logits()
        fused_mod._launch_bwd_rows(x, targets, lse, ent, a, b, 1.0, -100)

    def g1_step():
        torch.index_select(weight, 0, safe, out=g1)
        g1.addmm_(x, weight, alpha=-1.0)

    stages = {}
    stages["mm_logits"] = t(logits)
    stages["fwd_rows_stats"] = t(lambda: fused_mod._launch_fwd_rows(x, targets, logp, ent, lse, 1.0, -100, False))
    stages["fwd_rows_probs"] = t(fwd_probs) - stages["mm_logits"]
    stages["bwd_rows_dz"] = t(bwd_dz) - stages["mm_logits"]
    stages["g1_addmm"] = t(g1_step)
    stages["dh_mm"] = t(lambda: torch.mm(x, weight, out=g1))
    out = {k: round(val * n / chunk, 2) for k, val in stages.items()}
    log({"kind": "breakdown", "N": n, "chunk": chunk, "programs_per_sm": fused_mod.PROGRAMS_PER_SM,
         "ms_scaled_to_N": out})
    del hidden, weight, x, g1
    free()


def profile_step(fn, inputs, mode, label):
    """Kernel-level device times of one fwd+bwd step (torch.profiler), top entries."""
    from torch.profiler import ProfilerActivity, profile

    hidden, weight, targets, a, b = inputs
    step(fn, hidden, weight, targets, a, b, mode)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(fn, hidden, weight, targets, a, b, mode)
        torch.cuda.synchronize()
    hidden.grad = None
    events = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = events.table(sort_by=key, row_limit=14, max_name_column_width=60)
            break
        except Exception:  # noqa: BLE001
            table = None
    print(f"--- profile {label} ({mode}) ---")
    print(table)


def run_sweep(args):
    log(header())
    h, v = args.hidden, args.vocab
    row_bytes = v * 2
    for n in args.n:
        mm_ms, mm_tflops = matmul_rate(min(n, 20480), h, v)
        log({"kind": "matmul", "N": n, "ms_one_product": round(mm_ms * n / min(n, 20480), 2), "tflops": round(mm_tflops, 1)})
        breakdown(n, h, v, 1024)
        for pps, bv, nw in ((1, 32768, 32), (2, 16384, 16)):
            fused_mod.PROGRAMS_PER_SM, fused_mod.FWD_BLOCK_V, fused_mod.FWD_NUM_WARPS = pps, bv, nw
            breakdown(n, h, v, 1024)
        fused_mod.PROGRAMS_PER_SM, fused_mod.FWD_BLOCK_V, fused_mod.FWD_NUM_WARPS = 0, 8192, 16
        inputs = make_inputs(n, h, v)
        profile_step(ours_logp, inputs, "logp", "ours")
        profile_step(ours, inputs, "logp+ent", "ours")
        free()
        names = ("SCRATCH_BYTES", "PROGRAMS_PER_SM", "FWD_BLOCK_V", "FWD_NUM_WARPS")
        base = {k: getattr(fused_mod, k) for k in names}
        variants = []
        for mode in ("logp", "logp+ent"):
            variants += [
                (mode, {}),
                (mode, {"PROGRAMS_PER_SM": 1, "FWD_BLOCK_V": 32768, "FWD_NUM_WARPS": 32}),
                (mode, {"PROGRAMS_PER_SM": 1, "FWD_BLOCK_V": 16384, "FWD_NUM_WARPS": 16}),
                (mode, {"PROGRAMS_PER_SM": 2, "FWD_BLOCK_V": 16384, "FWD_NUM_WARPS": 16}),
                (mode, {"PROGRAMS_PER_SM": 4, "FWD_BLOCK_V": 8192, "FWD_NUM_WARPS": 8}),
                (mode, {"SCRATCH_BYTES": 512 * row_bytes}),
                (mode, {"SCRATCH_BYTES": 2048 * row_bytes}),
            ]
        for mode, var in variants:
            for k, val in var.items():
                setattr(fused_mod, k, val)
            fn = ours_logp if mode == "logp" else ours
            try:
                ms, ms_min, peak = measure(fn, inputs, mode, args.reps, 1)
                log({"kind": "sweep", "N": n, "mode": mode, "variant": var, "ms": round(ms, 2),
                     "ms_min": round(ms_min, 2), "peak_gib": round(peak / GIB, 3)})
            except Exception as exc:  # noqa: BLE001
                log({"kind": "sweep", "N": n, "mode": mode, "variant": var, "error": f"{type(exc).__name__}: {exc}"[:300]})
            free()
            for k, val in base.items():
                setattr(fused_mod, k, val)
        del inputs
        free()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4096, 20480, 163840])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--methods", nargs="*", help="subset of: naive chunked compiled liger ours")
    p.add_argument("--sweep", action="store_true", help="tune ours: constants and a per-stage breakdown")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_logprob.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    (run_sweep if args.sweep else run_bench)(args)


if __name__ == "__main__":
    main()
