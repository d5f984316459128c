#!/usr/bin/env python
"""Build a random-weight model of a real model's shape, offline, for GPU benchmarks.

GPU hosts here have no internet: the benchmarks build their models. The tokenizer is
tests/conftest.py's character tokenizer (with its chat template), padded with filler tokens
to the shape's vocabulary so that every id the model samples decodes. The architecture is
Llama with the shape's dimensions (Qwen2's q/k/v biases as attention_bias): a config.json of
model_type qwen2 would make transformers 5 rebuild the character tokenizer as Qwen2Tokenizer.

  python scripts/random_model.py qwen2.5-0.5b /tmp/q05      # ~1 GB bf16
  python scripts/random_model.py llama-3.1-8b /tmp/l8b      # ~16 GB bf16, built on the GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

# meta-llama/Llama-3.1-8B's config.json (the fields that shape the model), RoPE scaling included
LLAMA_31_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "initializer_range": 0.02,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}  # fmt: skip
SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True,
                         rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6, initializer_range=0.02),
    # Qwen/Qwen2.5-1.5B's dimensions: the "5 GB of GPU memory" shape (issue 7)
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True,
                         rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6, initializer_range=0.02),
    "llama-3.1-8b": LLAMA_31_8B,
}  # fmt: skip


def build(shape: str, path: Path) -> dict:
    """Save a random model of `shape` and its tokenizer to `path`; returns a summary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import build_tiny_model

    import tempfile

    from transformers import AutoTokenizer

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # its tokenizer and chat template; its tiny model is dropped
        tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(Path(tmp)))
    dims = SHAPES[shape]
    tokenizer.add_tokens([f"<w{i}>" for i in range(dims["vocab_size"] - len(tokenizer))])
    config = LlamaConfig(**dims, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)  # fmt: skip
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    return {"shape": shape, "path": str(path), "params": params, "vocab": len(tokenizer),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def ensure(shape: str, path: Path) -> None:
    """The random model of `shape` at `path`, built there if missing, in a process of its own: a
    benchmark that built it itself would keep the CUDA context (and cached memory) in its process,
    where it counts in the memory measured and in what a vLLM engine finds free."""
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).resolve()), shape, str(path)], check=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    print(json.dumps(build(args.shape, args.path)))
