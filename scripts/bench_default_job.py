"""Run the embedded default job (`grpo-ray` with no overrides unless given) and report its learning.

Prints one JSON line: wall time, the seed, the mean reward of each step, and the mean over the
first and last `--window` steps. Usage: python scripts/bench_default_job.py [--window 3] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpo_ray.config import load_config
from grpo_ray.metrics import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=int, default=3, help="steps averaged at the start and at the end")
    args, overrides = parser.parse_known_args()
    out = Path(tempfile.mkdtemp(prefix="grpo-default-"))
    overrides = [*overrides, f"logging.output_dir={out}", "logging.run_name=bench"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "grpo_ray", *overrides], check=True)
    wall = time.perf_counter() - start
    records = read_metrics(out / "bench")
    rewards = [r["reward"] for r in records]
    w = args.window
    print(json.dumps({
        "bench": "default_job",
        "overrides": overrides[:-2],
        "seed": load_config(overrides).trainer.seed,
        "wall_s": round(wall, 1),
        "steps": len(records),
        "reward_per_step": [round(r, 3) for r in rewards],
        f"reward_first_{w}": round(sum(rewards[:w]) / w, 3),
        f"reward_last_{w}": round(sum(rewards[-w:]) / w, 3),
        "per_reward_last": {k: round(v, 3) for k, v in records[-1].items() if k.startswith("rewards/") and k.endswith("/mean")},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
