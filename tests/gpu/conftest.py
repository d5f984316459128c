"""Tests marked ``gpu`` need a CUDA device: skipped (with the reason) anywhere else."""

from __future__ import annotations

from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory) -> Path:
    """build_tiny_model's character tokenizer with a wider Llama (head_dim 64, q/k/v/o biases, like
    Qwen2's qkv biases), saved in bf16: vLLM fuses its q|k|v and gate|up exactly as for Qwen2.

    (A config.json of model_type qwen2 would make transformers 5 rebuild the character tokenizer
    as Qwen2Tokenizer, see offline-gpu/README.md.)
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"))
    config = LlamaConfig.from_pretrained(path)
    config.update(dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, attention_bias=True, initializer_range=0.08))  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # HF zero-initialises biases; non-zero ones would show a bias mix-up
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(path)  # the engine and HF load the same bf16 values
    return path
