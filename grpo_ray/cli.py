"""`grpo-ray [overrides...]`: compose the config and run a job.

Subcommands for what a run made:
  grpo-ray plot <run_dir> [--out PNG]                      reward curves as a PNG
  grpo-ray eval <run_dir | adapter_dir> [--base] [--out JSON] [overrides...]
                                                           score a task's test split, JSON report
  grpo-ray export <run_dir | adapter_dir> --merged [--out DIR] [--dtype bfloat16]
                                                           base + adapter merged, for transformers / vLLM
"""

from __future__ import annotations

import argparse
import sys

from grpo_ray.config import ConfigError, load_config, to_yaml
from grpo_ray.data import DataError

SUBCOMMANDS = ("plot", "eval", "export")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and `python -m grpo_ray`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__ + "\n\nExample: grpo-ray task=gsm8k trainer.lr=5e-6 rollout.num_generations=8\n")
        print(to_yaml(load_config()))
        return 0
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return _subcommand(argv)
        cfg = load_config(argv)
        from grpo_ray.trainer import Interrupted, train

        try:
            train(cfg)
        except Interrupted as e:  # SIGTERM/SIGINT: checkpointed; exit as a signalled process would
            print(f"grpo-ray: {e}", file=sys.stderr)
            return 128 + e.signum
    except _user_errors() as e:
        print(f"grpo-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message tells the user what to change: printed without a traceback, exit code 2."""
    from grpo_ray.errors import EngineStartError, OutOfMemory
    from grpo_ray.evaluate import EvalError
    from grpo_ray.models import ModelLoadError
    from grpo_ray.rewards import RewardImportError, RewardLoadError

    return (ConfigError, DataError, EvalError, ModelLoadError, RewardLoadError, RewardImportError, FileNotFoundError,
            EngineStartError, OutOfMemory)  # fmt: skip


def _parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one subcommand (separate parsers: flags may follow the overrides)."""
    parser = argparse.ArgumentParser(prog=f"grpo-ray {command}")
    if command == "plot":
        parser.description = "Reward curves of a run as a PNG."
        parser.add_argument("run_dir", help="a run directory (outputs/<run-name>, with metrics.jsonl)")
        parser.add_argument("--out", help="PNG path (default: <run_dir>/reward_curves.png)")
    elif command == "eval":
        parser.description = "Score a task's test split with a trained adapter; writes a JSON report."
        parser.add_argument("target", help="a run directory (its final/ adapter and config) or a PEFT adapter folder")
        parser.add_argument("overrides", nargs="*",
                            help="config overrides: task=gsm8k task.num_examples=200 eval.greedy=false eval.k=8")  # fmt: skip
        parser.add_argument("--base", action="store_true", help="evaluate the base model, without the adapter")
        parser.add_argument("--out", help="report path (default: <run_dir>/eval/<task>-<split>[-k<k>][-base].json)")
    else:
        parser.description = "Write the base model with the adapter merged in, loadable by transformers and vLLM."
        parser.add_argument("target", help="a run directory or a PEFT adapter folder")
        parser.add_argument("--merged", action="store_true", required=True, help="merge the adapter into the base")
        parser.add_argument("--out", help="output folder (default: <adapter>/merged, i.e. <run_dir>/final/merged)")
        parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return parser


def _subcommand(argv: list[str]) -> int:
    command = argv[0]
    args = _parser(command).parse_intermixed_args(argv[1:])
    if command == "plot":
        from grpo_ray.plots import plot_run

        print(f"grpo-ray: wrote {plot_run(args.run_dir, args.out)}")
    elif command == "eval":
        from grpo_ray.evaluate import eval_config, evaluate, format_report, resolve_target

        target = resolve_target(args.target, base=args.base)
        report = evaluate(eval_config(target, args.overrides), target, args.out)
        print(format_report(report))
    else:
        from grpo_ray.export import export_merged

        print(f"grpo-ray: wrote the merged model to {export_merged(args.target, args.out, args.dtype)}")
    return 0
