"""`grpo-ray [overrides...]`: compose the config and run a job."""

from __future__ import annotations

import sys

from grpo_ray.config import ConfigError, load_config, to_yaml
from grpo_ray.data import DataError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and `python -m grpo_ray`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__ + "\n\nExample: grpo-ray task=gsm8k trainer.lr=5e-6 rollout.num_generations=8\n")
        print(to_yaml(load_config()))
        return 0
    try:
        cfg = load_config(argv)
        from grpo_ray.trainer import train

        train(cfg)
    except (ConfigError, DataError) as e:
        print(f"grpo-ray: error: {e}", file=sys.stderr)
        return 2
    return 0
