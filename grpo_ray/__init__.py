"""grpo_ray: a GRPO trainer for language models built as Ray actors.

Importing the package stays light: no vllm, bitsandbytes or ray at import time.
"""

__version__ = "0.1.0"
