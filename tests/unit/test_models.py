"""grpo_ray.models: what fails before any model work (QLoRA without CUDA or bitsandbytes, contexts past
the model's window), with the setting to change. The QLoRA load itself is tested in tests/gpu."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from grpo_ray import models
from grpo_ray.config import load_config
from grpo_ray.models import ModelLoadError, add_lora, check_model, load_model


def _no_model_work(monkeypatch):
    """Make any attempt to load weights fail the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_nf4_on_a_cpu_names_the_setting_and_the_install(tiny_model_dir, monkeypatch):
    _no_model_work(monkeypatch)
    cfg = load_config([f"model.name_or_path={tiny_model_dir}", "model.quantization=nf4"])
    with pytest.raises(ModelLoadError, match=r"model.quantization=nf4 .*a CUDA device \(this process runs on cpu\)") as e:
        load_model(cfg.model, str(tiny_model_dir), "cpu")
    assert "pip install -e .[gpu]" in str(e.value) and "model.quantization=none" in str(e.value)


def test_nf4_without_bitsandbytes_names_the_package(tiny_model_dir, monkeypatch):
    _no_model_work(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    cfg = load_config([f"model.name_or_path={tiny_model_dir}", "model.quantization=nf4"])
    with pytest.raises(ModelLoadError, match=r"needs the bitsandbytes package: .*pip install -e \.\[gpu\]") as e:
        load_model(cfg.model, str(tiny_model_dir), "cuda:0")
    assert "CUDA device" not in str(e.value)


def test_nf4_asks_transformers_for_double_quantized_nf4_on_the_device(monkeypatch):
    # transformers builds the config object without bitsandbytes; only the CUDA and package checks need faking
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    kwargs = models._quantization_kwargs("nf4", "cuda:1", torch.bfloat16)
    q = kwargs["quantization_config"]
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["device_map"] == {"": 1}
    assert models._quantization_kwargs("none", "cpu", torch.float32) == {}


def test_context_past_the_window_names_both_lengths_and_the_window(tiny_model_dir):
    cfg = load_config([f"model.name_or_path={tiny_model_dir}", "rollout.max_prompt_length=300",
                       "rollout.max_completion_length=213"])  # fmt: skip
    with pytest.raises(ModelLoadError) as e:
        check_model(str(tiny_model_dir), cfg.model, cfg.rollout)  # the tiny model's window is 512
    message = str(e.value)
    for part in ("rollout.max_prompt_length=300", "rollout.max_completion_length=213", "513 tokens",
                 "max_position_embeddings=512"):  # fmt: skip
        assert part in message, (part, message)


def test_context_within_the_window_passes(tiny_model_dir):
    cfg = load_config([f"model.name_or_path={tiny_model_dir}", "rollout.max_prompt_length=300",
                       "rollout.max_completion_length=212"])  # fmt: skip
    check_model(str(tiny_model_dir), cfg.model, cfg.rollout)
    # prompts without a cap are not counted; a completion alone past the window still fails
    cfg = load_config([f"model.name_or_path={tiny_model_dir}", "rollout.max_prompt_length=null",
                       "rollout.max_completion_length=600"])  # fmt: skip
    with pytest.raises(ModelLoadError, match="rollout.max_prompt_length=null"):
        check_model(str(tiny_model_dir), cfg.model, cfg.rollout)


def test_lora_computes_in_the_activations_dtype_with_fp32_parameters():
    """A bf16 model: LoRA's matmuls run in bf16, so no fp32 copy of an adapted layer's input is kept
    for backward (peft keeps one per layer); its parameters and gradients stay fp32, and the output
    is peft's fp32-LoRA output to bf16 precision."""
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(config).to(torch.bfloat16),
                     SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]))  # fmt: skip
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    ids = torch.randint(0, 61, (2, 9))

    def forward() -> tuple[torch.Tensor, int]:
        """Logits, and the fp32 bytes autograd keeps for backward."""
        saved: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            if t.dtype == torch.float32:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logits = model(input_ids=ids).logits
        return logits, sum(saved.values())

    ours, ours_fp32 = forward()
    ours.float().pow(2).mean().backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lora.values())
    assert all(p.grad.abs().sum() > 0 for p in lora.values())
    for module in model.modules():  # back to peft's own path: the input cast to fp32, fp32 matmuls
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = True
            for linear in [*module.lora_A.values(), *module.lora_B.values()]:
                del linear.forward
    peft_logits, peft_fp32 = forward()
    # peft keeps an fp32 copy of the input of q|k|v, o, gate|up and down: 4 at least, 18 tokens each
    assert peft_fp32 - ours_fp32 >= 4 * 18 * 32 * 4, (ours_fp32, peft_fp32)
    torch.testing.assert_close(ours.detach(), peft_logits.detach(), rtol=0.05, atol=0.05)
