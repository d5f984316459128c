#!/usr/bin/env python
"""The longest context per sequence one learner step fits (issue 13): Llama-3.1-8B shape, QLoRA r=16, 4 generations.

For each configuration and memory budget, searches the total length per sequence (a 512-token
prompt + its completion): doubling from --start until a step fails (out of memory, over the
budget by nvidia-smi, or over --timeout), then bisection down to --granularity tokens. Each
attempt is one learner step (forward, GRPO loss, backward, AdamW) after a warm-up, in a fresh
process, built and measured as scripts/bench_memory.py does (random weights made on the GPU);
one JSON line per attempt with peak memory (torch and nvidia-smi), step time and tokens/s.

Configurations (every one: nf4, one sequence per micro-batch):
  ours                offload checkpointing, fused Triton loss, trainer.sequence_chunk_tokens=4096
  no_sequence_chunks  ours without sequence chunks (MLPs and norms over the whole sequence at once)
  no_offload          ours with gradient_checkpointing=on (layer inputs stay on the GPU)
  reference_kernel    ours with the chunked torch loss instead of the fused kernel
Budgets: the whole GPU, and each --caps value in GiB, enforced with
torch.cuda.set_per_process_memory_fraction (going over fails instead of borrowing the rest of the
card); an attempt whose nvidia-smi peak (the whole device, CUDA context included) exceeds the cap
counts as failed too.

    PYTHONPATH=. python scripts/bench_context.py --configs ours --caps 24 --out /tmp/context
    PYTHONPATH=. python scripts/bench_context.py --configs ours --no-whole-gpu --caps 79.6 24  # an H200 as an H100 80GB (79.6 GiB)
    PYTHONPATH=. python scripts/bench_context.py --configs no_offload no_sequence_chunks --caps 24 --lengths 8192 16384 32768

Writes <out>/context.jsonl (every attempt), prints a Markdown table of the largest length that fit
per configuration and budget, and plots peak memory against length (<out>/context.png; needs
matplotlib). The whole colocated step (the engine generating the group too) is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_memory import Row, Shape, log, measure  # noqa: E402
from random_model import LLAMA_31_8B  # noqa: E402

PROMPT_TOKENS = 512
GENERATIONS = 4
CONFIGS = {
    "ours": Row("nf4", "offload", "triton", "sequence", sequence_chunk_tokens=4096),
    "no_sequence_chunks": Row("nf4", "offload", "triton", "sequence"),
    "no_offload": Row("nf4", "on", "triton", "sequence", sequence_chunk_tokens=4096),
    "reference_kernel": Row("nf4", "offload", "reference", "sequence", sequence_chunk_tokens=4096),
}


def shape_of(length: int) -> Shape:
    """The issue's shape at `length` tokens per sequence."""
    return Shape(LLAMA_31_8B, generations=GENERATIONS, prompt_tokens=PROMPT_TOKENS, completion_tokens=length - PROMPT_TOKENS)


def fits(record: dict[str, Any]) -> bool:
    """A step that finished within its budget (the cap, measured device-wide by nvidia-smi, when one is set)."""
    cap, smi = record.get("cap_gib"), record.get("smi_peak_gib")
    return "error" not in record and (cap is None or smi is None or smi <= cap)


def attempt(config: str, length: int, cap_gib: float | None, timeout_s: float) -> dict[str, Any]:
    """One step in a fresh process (its peaks its own); the record, with `error` when it failed."""
    command = [sys.executable, os.path.abspath(__file__), "--attempt", config, str(length), str(cap_gib or 0)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    base = {"row": config, "length": length, "cap_gib": cap_gib}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout_s:.0f} s"}
    records = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not records:
        return {**base, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:]}
    return {**json.loads(records[-1]), **base, "wall_s": round(time.perf_counter() - start, 1)}


def try_length(config: str, length: int, cap_gib: float | None, timeout_s: float, sink: Any) -> bool:
    """One attempt, logged and written to `sink`; whether it fit."""
    record = attempt(config, length, cap_gib, timeout_s)
    record["fits"] = fits(record)
    log(record)
    sink.write(json.dumps(record) + "\n")
    sink.flush()
    return record["fits"]


def search(config: str, cap_gib: float | None, start: int, granularity: int, limit: int, timeout_s: float,
           sink: Any) -> int:  # fmt: skip
    """The largest length (a multiple of `granularity`, at most `limit`) whose step fits; 0 if none."""
    good, bad, length = 0, None, start
    while length <= limit:  # doubling
        if not try_length(config, length, cap_gib, timeout_s, sink):
            bad = length
            break
        good, length = length, length * 2
    if bad is None:
        return good
    while bad - good > granularity:  # bisection on the granularity's grid
        middle = (good + bad) // 2 // granularity * granularity
        if middle in (good, bad):
            break
        good, bad = (middle, bad) if try_length(config, middle, cap_gib, timeout_s, sink) else (good, middle)
    return good


def sweep(config: str, cap_gib: float | None, lengths: list[int], timeout_s: float, sink: Any) -> int:
    """The given lengths in increasing order until one does not fit (points for the plot, no search);
    the longest that fit, 0 if none."""
    good = 0
    for length in sorted(lengths):
        if not try_length(config, length, cap_gib, timeout_s, sink):
            break
        good = length
    return good


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Peak allocated memory against length, one line per configuration and budget."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no plot: matplotlib is not installed; the numbers are in {path.with_suffix('.jsonl')})")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in sorted({(r["row"], r["cap_gib"]) for r in records}, key=str):
        points = sorted((r["length"], r["peak_allocated_gib"]) for r in records
                        if (r["row"], r["cap_gib"]) == key and r.get("fits"))  # fmt: skip
        if points:
            label = f"{key[0]}" + (f" (cap {key[1]:g} GiB)" if key[1] else "")
            ax.plot([p[0] / 1024 for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("tokens per sequence (K), 4 sequences a step")
    ax.set_ylabel("peak allocated GiB (learner step)")
    ax.set_title("Llama-3.1-8B shape, QLoRA r=16: learner memory against context length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--caps", nargs="*", type=float, default=[24.0], help="GiB budgets besides the whole GPU")
    parser.add_argument("--no-whole-gpu", action="store_true",
                        help="only the --caps budgets (on a card larger than the 80 GB one of the issue: --caps 79.6 24, an H100 80GB holds 79.6 GiB)")
    parser.add_argument("--start", type=int, default=4096)
    parser.add_argument("--granularity", type=int, default=4096)
    parser.add_argument("--limit", type=int, default=131072, help="longest length tried (Llama-3.1-8B's window: 131072)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per attempt")
    parser.add_argument("--lengths", nargs="+", type=int,
                        help="try these lengths (increasing, until one fails) instead of searching: e.g. the ablations' points")
    parser.add_argument("--out", type=Path, default=Path("bench_context"))
    parser.add_argument("--attempt", nargs=3, help=argparse.SUPPRESS)  # internal: CONFIG LENGTH CAP_GIB, here
    args = parser.parse_args()
    if args.attempt:
        config, length, cap = args.attempt[0], int(args.attempt[1]), float(args.attempt[2]) or None
        log(measure(config, CONFIGS[config], f"llama-3.1-8b@{length}", shape_of(length), cap))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    best: dict[tuple[str, float | None], int] = {}
    with open(args.out / "context.jsonl", "a") as sink:
        for cap in [*([] if args.no_whole_gpu else [None]), *args.caps]:
            for config in args.configs:
                best[config, cap] = (sweep(config, cap, args.lengths, args.timeout, sink) if args.lengths else
                                     search(config, cap, args.start, args.granularity, args.limit, args.timeout, sink))
    records = [json.loads(line) for line in (args.out / "context.jsonl").read_text().splitlines()]
    budget = lambda cap: "whole GPU" if cap is None else f"{cap:g} GiB"  # noqa: E731
    print("\n| configuration | budget | longest sequence that fit (tokens) |\n|---|---|---:|")
    for (config, cap), length in best.items():
        print(f"| {config} | {budget(cap)} | {length} |")
    print("\n| configuration | budget | tokens per sequence | peak allocated GiB | nvidia-smi GiB | step s | tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in sorted((r for r in records if r.get("fits")), key=lambda r: (r["row"], str(r["cap_gib"]), r["length"])):
        print(f"| {r['row']} | {budget(r['cap_gib'])} | {r['length']} | {r['peak_allocated_gib']} | "
              f"{r['smi_peak_gib']} | {r['step_s']} | {r['tokens_per_s']} |")  # fmt: skip
    plot(records, args.out / "context.png")


if __name__ == "__main__":
    main()
