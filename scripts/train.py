"""Job entry point: `python scripts/train.py [overrides...]`, e.g. under `ray job submit`."""

import sys

from grpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
