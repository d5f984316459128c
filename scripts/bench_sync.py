#!/usr/bin/env python
"""Weight sync, step time and memory: one GPU with CUDA IPC (one copy of the base) or the object
store (two), against separate GPUs with NCCL.

For each model shape and sync path, runs `grpo-ray rollout=vllm` for a few steps on a
random-weight model (scripts/random_model.py) with LoRA r=16 on all linear layers, with
`cluster=single_gpu` (cuda_ipc, object_store) or `cluster=split` (nccl: rollout and learner on
two GPUs), and reports, side by side:
- sync latency: the trainer's `time/sync` per step, from the learner's finished optimizer step
  to the engine holding the new adapter (the next generate uses it), p50 / p95 over the steps;
  its part on the rollout's side, the engine call (`time/sync_engine`, vLLM's collective_rpc
  included), and with CUDA IPC the copy in the worker (`time/sync_copy`);
- memory: device memory used by all processes on all GPUs, or on the one GPU CUDA_VISIBLE_DEVICES
  leaves the run (nvidia-smi, sampled every 0.2 s through the run, max), per process (max), and
  the learner's torch peak (`memory/learner_peak_gib`).
Prints one JSON line per run, then a Markdown table.

A path may carry a mode: `PATH:inproc` runs vLLM's EngineCore in the rollout actor's process
(no RPC hop), `PATH:async` sets trainer.async_steps=1 (generation of step k+1 beside training of k).

  python scripts/bench_sync.py --shapes qwen2.5-0.5b llama-3.1-8b --paths cuda_ipc nccl --steps 30 --models /tmp/models
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import SmiPeak, smi_rows  # noqa: E402
from random_model import ensure  # noqa: E402

from grpo_ray.config import load_config  # noqa: E402
from grpo_ray.metrics import read_metrics  # noqa: E402


def visible_gpu() -> str | None:
    """The UUID of the one GPU CUDA_VISIBLE_DEVICES leaves this run (another job may use the others),
    from nvidia-smi (CUDA stays uninitialised here: its context would count); else None, every GPU."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) != 1:
        return None
    uuids = dict(smi_rows("--query-gpu=index,uuid"))
    return visible[0] if visible[0].startswith("GPU-") else uuids.get(visible[0], visible[0])


def percentiles(values_s: list[float]) -> tuple[float, float]:
    """p50 and p95 of seconds, in ms."""
    ms = sorted(v * 1e3 for v in values_s)
    return round(statistics.median(ms), 2), round(ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))], 2)


MODES = {"": [], "inproc": [], "async": ["trainer.async_steps=1"]}


def run(model_dir: Path, variant: str, steps: int, out: Path, extra: list[str], timeout_s: float | None = None) -> dict:
    """One training run with `cluster.weight_sync=PATH` (variant `PATH[:MODE]`, MODES); its sync
    times, step times and memory. A run past `timeout_s` is killed with its process group."""
    path, _, mode = variant.partition(":")
    if mode not in MODES:
        raise SystemExit(f"--paths {variant}: unknown mode {mode!r}; modes: inproc, async")
    env = {**os.environ, **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if mode == "inproc" else {})}
    run_name = variant.replace(":", "_")
    overrides = [
        f"model.name_or_path={model_dir}", "model.dtype=auto", "rollout=vllm",
        f"cluster={'split' if path == 'nccl' else 'single_gpu'}", f"cluster.weight_sync={path}", *MODES[mode],
        "task=arithmetic", f"trainer.max_steps={steps}", "rollout.num_generations=4",
        "rollout.max_completion_length=16", "trainer.per_device_train_batch_size=16", "model.lora.r=16",
        "model.lora.alpha=32", "logging.tensorboard=false", "logging.plot=false", "logging.sample_steps=0",
        f"logging.output_dir={out}", f"logging.run_name={run_name}", *extra,
    ]  # fmt: skip
    with SmiPeak(visible_gpu(), interval_s=0.2) as smi:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "grpo_ray", *overrides], env=env, start_new_session=True)
        try:
            code = proc.wait(timeout_s)
            error = f"exit {code}" if code else None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            error = f"timed out after {timeout_s:g} s"
        wall = time.perf_counter() - start
    row = {"bench": "sync", "model": model_dir.name, "weight_sync": variant, "wall_s": round(wall, 1),
           "gpu_used_gib_max": None if smi.peak is None else round(smi.peak, 2),
           "per_process_gib_max": sorted((round(v, 2) for v in smi.per_process.values()), reverse=True)}  # fmt: skip
    if error:  # the memory measured up to the failure still counts
        return {**row, "error": error}
    records = read_metrics(out / run_name)
    trainer = load_config(overrides).trainer  # the task may set gradient_accumulation_steps
    parts = {name: percentiles([r[f"time/{name}"] for r in records if f"time/{name}" in r])
             for name in ("sync", "sync_engine", "sync_copy") if any(f"time/{name}" in r for r in records)}  # fmt: skip
    return {
        **row, "steps": len(records), "completions_per_step": trainer.per_device_train_batch_size * trainer.gradient_accumulation_steps,
        **{f"{name}_ms_p50_p95": value for name, value in parts.items()},
        "sync_ms_min": round(min(r["time/sync"] for r in records) * 1e3, 2),
        "step_s_p50": round(statistics.median(r["time/step"] for r in records), 3),
        "tokens_per_s_p50": round(statistics.median(r["perf/tokens_per_s"] for r in records)),
        "learner_peak_gib": round(max(r.get("memory/learner_peak_gib", 0.0) for r in records), 2),
        "sampling_logp_gap_max": round(max(r["sampling/sampling_logp_difference/max"] for r in records), 4),
        # the sync check's quantity (trainer.sync_check_tolerance bounds it): its largest over the steps
        "sampling_logp_gap_mean_max": round(max(r["sampling/sampling_logp_difference/mean"] for r in records), 4),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b"])
    parser.add_argument("--paths", nargs="+", default=["cuda_ipc", "object_store"],
                        help="cluster.weight_sync values (nccl: cluster=split, two GPUs), each optionally PATH:inproc or PATH:async")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "grpo_ray_models")
    args, extra = parser.parse_known_args()
    results = []
    for shape in args.shapes:
        model_dir = args.models / shape
        ensure(shape, model_dir)
        for path in args.paths:
            results.append(run(model_dir, path, args.steps, Path(tempfile.mkdtemp(prefix="bench-sync-")), extra))
            print(json.dumps(results[-1]), flush=True)
    print("\n| model | weight_sync | sync p50 / p95 ms | of which engine call / copy p50 ms | step p50 s | tokens/s p50 | "
          "GPU used max GiB | per process GiB | learner peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['weight_sync']} | failed ({r['error']}; its log is above) |||| "
                  f"{r['gpu_used_gib_max']} (until it failed) | {r['per_process_gib_max']} ||")
            continue
        engine, copy = (r.get(f"{name}_ms_p50_p95", ("-",))[0] for name in ("sync_engine", "sync_copy"))
        print(f"| {r['model']} | {r['weight_sync']} | {' / '.join(map(str, r['sync_ms_p50_p95']))} | {engine} / {copy} | "
              f"{r['step_s_p50']} | {r['tokens_per_s_p50']} | {r['gpu_used_gib_max']} | {r['per_process_gib_max']} | {r['learner_peak_gib']} |")  # fmt: skip


if __name__ == "__main__":
    main()
