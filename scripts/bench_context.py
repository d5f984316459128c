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

Part (b), configuration `whole_step`: one colocated `grpo-ray rollout=vllm` step instead, through
scripts/bench_sync.py's run (nvidia-smi sampled over all processes on the run's GPU): the 4-bit
engine generates the group (prompts of 512 tokens in the model's chat template, completions forced
to length with ignore_eos), syncs the adapter and the learner takes its step with `ours`' settings.
The model is saved under --models (scripts/random_model.py builds it there if missing). A budget is
enforced by the run's own caps, passed with --overrides, e.g. `rollout.kv_cache_gib=11
cluster.learner_memory_gib=13`; over the budget by nvidia-smi counts as failed, as above.

    PYTHONPATH=. python scripts/bench_context.py --configs whole_step --no-whole-gpu --caps 24 --lengths 40960 \
        --models /tmp/models --overrides rollout.kv_cache_gib=11 rollout.kv_cache_dtype=fp8 cluster.learner_memory_gib=13

Speed, `--speed REPEATS --lengths ...`: instead of the search, each configuration's learner
tokens/s at the given lengths side by side in one process and on one model, the lengths' steps
taken in turn REPEATS times (the issue's "within 15 % at 32K of 4K"); medians to <out>/speed.jsonl.

    PYTHONPATH=. python scripts/bench_context.py --configs ours no_sequence_chunks --speed 3 --lengths 4096 32768

Writes <out>/context.jsonl (every attempt), prints a Markdown table of the largest length that fit
per configuration and budget, and plots peak memory against length (<out>/context.png; needs
matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sync  # noqa: E402
import torch  # noqa: E402
from bench_memory import Row, Shape, build_model, log, make_learner, measure, random_rollout, versions  # noqa: E402
from random_model import LLAMA_31_8B, ensure  # noqa: E402

PROMPT_TOKENS = 512
GENERATIONS = 4
CONFIGS = {
    "ours": Row("nf4", "offload", "triton", "sequence", sequence_chunk_tokens=4096),
    "no_sequence_chunks": Row("nf4", "offload", "triton", "sequence"),
    "no_offload": Row("nf4", "on", "triton", "sequence", sequence_chunk_tokens=4096),
    "reference_kernel": Row("nf4", "offload", "reference", "sequence", sequence_chunk_tokens=4096),
}
WHOLE_STEP = "whole_step"  # part (b): the colocated grpo-ray step, the engine generating the group


@dataclass
class WholeStep:
    """Part (b)'s setup: the folder of the saved random model, and the run's own overrides (its caps)."""

    models: Path = Path(tempfile.gettempdir()) / "grpo_ray_models"
    overrides: list[str] = field(default_factory=list)


WHOLE = WholeStep()  # main() sets it from the command line


def shape_of(length: int, model_config: dict[str, Any] = LLAMA_31_8B) -> Shape:
    """The issue's shape at `length` tokens per sequence."""
    return Shape(model_config, generations=GENERATIONS, prompt_tokens=PROMPT_TOKENS, completion_tokens=length - PROMPT_TOKENS)


def fits(record: dict[str, Any]) -> bool:
    """A step that finished within its budget (the cap, measured device-wide by nvidia-smi, when one is set)."""
    cap, smi = record.get("cap_gib"), record.get("smi_peak_gib")
    return "error" not in record and (cap is None or smi is None or smi <= cap)


def attempt(config: str, length: int, cap_gib: float | None, timeout_s: float) -> dict[str, Any]:
    """One step in a fresh process (its peaks its own); the record, with `error` when it failed."""
    if config == WHOLE_STEP:
        return whole_step(length, cap_gib, timeout_s)
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


def speed(row: Row, lengths: list[int], repeats: int, model_config: dict[str, Any] = LLAMA_31_8B) -> dict[str, Any]:
    """Learner tokens/s at each length side by side: one process, one model, the lengths' steps taken in
    turn `repeats` times (after a warm-up step at each), so that drift between processes or over time
    falls on every length alike; per length, every step's time and the median's tokens/s."""
    from transformers import LlamaConfig

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    config = LlamaConfig(**model_config)
    model = build_model(config, device, quantize=row.quantization == "nf4")
    # the longest length's shape; the shortest's micro-batch budget: every sequence alone at every length
    learner = make_learner(model, row, shape_of(max(lengths), model_config), device, max_tokens=min(lengths))

    def step(length: int) -> tuple[float, int]:
        scored = random_rollout(shape_of(length, model_config), config.vocab_size,
                                [length - PROMPT_TOKENS] * GENERATIONS, learner.version)  # fmt: skip
        micro_batches = len(learner._micro_batches(scored))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        learner.train_step(scored)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, micro_batches

    for length in sorted(lengths, reverse=True):  # warm-up; the longest first sizes offloading's pinned host blocks
        step(length)
    times: dict[int, list[float]] = {length: [] for length in lengths}
    micro_batches: dict[int, int] = {}
    for _ in range(repeats):
        for length in lengths:
            seconds, micro_batches[length] = step(length)
            times[length].append(round(seconds, 3))
            print(f"speed: {length} tokens a sequence, {seconds:.2f} s", file=sys.stderr, flush=True)
    tokens_per_s = {n: round(GENERATIONS * n / statistics.median(t)) for n, t in times.items()}
    shortest = tokens_per_s[min(lengths)]
    return {
        "bench": "context_speed", **asdict(row), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu", **versions(), "repeats": repeats, "micro_batches": micro_batches, "step_s": times,
        "tokens_per_s_median": tokens_per_s, "slower_than_shortest": {n: round(1 - t / shortest, 4) for n, t in tokens_per_s.items()},
    }  # fmt: skip


def prompt_file(model_dir: Path, tokens: int, path: Path, rows: int = 8) -> int:
    """Write `rows` prompts that the model's chat template makes `tokens` long (or the longest below
    that its tokenizer allows) to a jsonl task file; their length in tokens."""
    from transformers import AutoTokenizer

    from grpo_ray.data import prompt_token_ids, to_messages

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    length = lambda n: len(prompt_token_ids(to_messages("a" * n, None), tokenizer))  # noqa: E731
    low, high = 0, 8 * tokens  # the longest filler whose prompt fits: length grows with n
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if length(middle) <= tokens else (low, middle - 1)
    path.write_text("".join(json.dumps({"prompt": "a" * low, "answer": "0"}) + "\n" for _ in range(rows)))
    return length(low)


def whole_step(length: int, cap_gib: float | None, timeout_s: float) -> dict[str, Any]:
    """Part (b) at `length` tokens a sequence: one colocated grpo-ray step (bench_sync.run); its record."""
    model_dir = WHOLE.models / "llama-3.1-8b"
    ensure("llama-3.1-8b", model_dir)
    out = Path(tempfile.mkdtemp(prefix="bench-context-"))
    prompt_tokens = prompt_file(model_dir, PROMPT_TOKENS, out / "prompts.jsonl")
    ours = CONFIGS["ours"]  # the learner's settings; one sequence a micro-batch
    overrides = [
        f"model.quantization={ours.quantization}", "task.source=file", f"task.path={out / 'prompts.jsonl'}",
        "task.num_examples=null", f"rollout.num_generations={GENERATIONS}", f"trainer.per_device_train_batch_size={GENERATIONS}",
        "trainer.gradient_accumulation_steps=1", f"rollout.max_prompt_length={prompt_tokens}",
        f"rollout.max_completion_length={length - prompt_tokens}", "+rollout.generation_kwargs.ignore_eos=true",
        f"trainer.gradient_checkpointing={ours.gradient_checkpointing}", f"loss.kernel={ours.kernel}",
        f"trainer.max_tokens_per_microbatch={length}", f"trainer.sequence_chunk_tokens={ours.sequence_chunk_tokens}",
        *WHOLE.overrides,
    ]  # fmt: skip
    record = bench_sync.run(model_dir, "cuda_ipc", 1, out, overrides, timeout_s)
    return {**record, "row": WHOLE_STEP, "length": length, "cap_gib": cap_gib, "prompt_tokens": prompt_tokens,
            "overrides": WHOLE.overrides, "smi_peak_gib": record["gpu_used_gib_max"],
            "peak_allocated_gib": record.get("learner_peak_gib"), "step_s": record.get("step_s_p50"),
            "tokens_per_s": record.get("tokens_per_s_p50")}  # fmt: skip


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
    key_of = lambda r: (r["row"], r["cap_gib"], r.get("alloc_conf") or "")  # noqa: E731
    records = [r for r in records if r["row"] != WHOLE_STEP]  # its peak_allocated_gib is the learner's beside the engine
    for key in sorted({key_of(r) for r in records}, key=str):
        mine = [r for r in records if key_of(r) == key and r.get("peak_allocated_gib") is not None]
        points = sorted((r["length"], r["peak_allocated_gib"]) for r in mine if r.get("fits"))
        failed = sorted((r["length"], r["peak_allocated_gib"]) for r in mine if not r.get("fits"))
        label = f"{key[0]}" + (f" (cap {key[1]:g} GiB)" if key[1] else "") + (f", {key[2]}" if key[2] else "")
        line = ax.plot([p[0] / 1024 for p in points], [p[1] for p in points], marker="o", label=label if points else None)[0]
        # attempts that failed (out of memory: the allocation reached when it failed; over the budget by nvidia-smi)
        ax.plot([p[0] / 1024 for p in failed], [p[1] for p in failed], "x", color=line.get_color(), markersize=9,
                label=None if points else label)  # fmt: skip
    ax.plot([], [], "kx", label="failed: out of memory, or over the budget")
    ax.set_xlabel("tokens per sequence (K), 4 sequences a step")
    ax.set_ylabel("peak allocated GiB (learner step)")
    ax.set_title("Llama-3.1-8B shape, QLoRA r=16: learner memory against context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=[*CONFIGS, WHOLE_STEP], default=list(CONFIGS))
    parser.add_argument("--models", type=Path, default=WHOLE.models, help="whole_step: the saved random model's folder")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="whole_step: grpo-ray overrides for its run, e.g. its caps rollout.kv_cache_gib=11 cluster.learner_memory_gib=13")
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
    parser.add_argument("--speed", type=int, metavar="REPEATS",
                        help="instead of the search: each config's tokens/s at --lengths, side by side in one process")
    parser.add_argument("--attempt", nargs=3, help=argparse.SUPPRESS)  # internal: CONFIG LENGTH CAP_GIB, here
    args = parser.parse_args()
    if args.overrides and WHOLE_STEP not in args.configs:
        parser.error(f"--overrides are for --configs {WHOLE_STEP}'s run")
    WHOLE.models, WHOLE.overrides = args.models, args.overrides
    if args.attempt:
        config, length, cap = args.attempt[0], int(args.attempt[1]), float(args.attempt[2]) or None
        log(measure(config, CONFIGS[config], f"llama-3.1-8b@{length}", shape_of(length), cap))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.speed:
        if not args.lengths or WHOLE_STEP in args.configs:
            parser.error("--speed compares learner steps at --lengths: give --lengths, and configs other than whole_step")
        with open(args.out / "speed.jsonl", "a") as sink:
            for config in args.configs:
                record = {"row": config, **speed(CONFIGS[config], args.lengths, args.speed)}
                log(record)
                sink.write(json.dumps(record) + "\n")
        return
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
