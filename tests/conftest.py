"""Shared fixtures: a tiny random causal LM with a character-level chat tokenizer, built offline."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) and a character tokenizer with a chat template, saved to `path`."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    chars = list(dict.fromkeys(string.printable))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|im_(start|end)\|>|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=vocab["<|im_end|>"],
        bos_token_id=vocab["<|im_start|>"], tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_ranks(target, world_size: int = 2, timeout_s: float = 240) -> list:
    """Run `target(rank, port, queue)` in `world_size` spawned processes (a process group's ranks
    meeting on a free local port); returns what they put on the queue, once all exited cleanly.

    The queue is drained while they run: a process that put more than a pipe's buffer (64 KiB)
    does not exit until someone reads it."""
    import queue as queue_module
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, port, queue)) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    results, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline and (any(proc.is_alive() for proc in procs) or not queue.empty()):
        try:
            results.append(queue.get(timeout=0.2))
        except queue_module.Empty:
            pass
    for proc in procs:
        proc.join(5)
    assert [proc.exitcode for proc in procs] == [0] * world_size
    return results


def write_run(cfg, model_dir: Path, run_dir: Path, *, seed: int, std: float, device: str = "cpu") -> Path:
    """A finished run's folder: config.yaml and a final/ adapter whose random B (N(0, std), seed)
    visibly changes the model. The adapter is made on the unquantized base: same shapes, and a
    4-bit base would need a GPU."""
    import torch
    from omegaconf import OmegaConf

    from grpo_ray.config import to_yaml
    from grpo_ray.models import add_lora, load_model

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    dense = OmegaConf.merge(cfg.model, {"quantization": "none"})
    model = add_lora(load_model(dense, str(model_dir), device), cfg.model.lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    model.save_pretrained(run_dir / "final")
    return run_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
