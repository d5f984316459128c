"""`grpo-ray export <run_dir | adapter_dir> --merged [--out DIR]`: base model + LoRA adapter merged
into one plain checkpoint (safetensors + config + tokenizer) that transformers and vLLM load
without peft.

The adapter itself (PEFT format) is already in `<run>/final/`; this writes the merged model to
`<adapter>/merged/` unless `--out` says otherwise. Merging runs in float32 on the CPU (W + B·A·α/r
computed once, exactly), then the result is cast to `dtype` (bfloat16 by default). From a QLoRA run
(model.quantization=nf4) W is the 4-bit base dequantized, the weights the adapter was trained on;
loading it takes a CUDA GPU with bitsandbytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from grpo_ray.evaluate import EvalError, Target, read_adapter_config, resolve_target
from grpo_ray.models import ModelLoadError, load_model, resolve_model_path

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_merged(target: Path | str | Target, out: Path | str | None = None, dtype: str = "bfloat16") -> Path:
    """Merge `target`'s adapter into its base model and save both with the tokenizer; returns the folder.

    1. find the adapter and its base model (the run's model config, else adapter_config.json);
    2. load the base in float32 (a 4-bit base dequantized), wrap it with the adapter (peft), merge and unload;
    3. cast to `dtype`, save_pretrained (safetensors) and the tokenizer, and a note of the sources.
    """
    if dtype not in DTYPES:
        raise EvalError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    target = target if isinstance(target, Target) else resolve_target(target)
    if target.adapter_dir is None:
        raise EvalError(f"{target.path}: no adapter to merge")
    # 1. the adapter and its base
    read_adapter_config(target.adapter_dir)  # only LoRA options the learner uses
    model_cfg = _model_config(target)
    model_path = resolve_model_path(model_cfg.name_or_path)
    # 2. merge in float32 on the CPU, into the base the adapter was trained on
    from peft import PeftModel

    if model_cfg.quantization == "none":
        base = load_model(_dense_float32(model_cfg), model_path, "cpu")
    else:
        base = _dequantized_base(model_cfg, model_path)
    merged = PeftModel.from_pretrained(base, str(target.adapter_dir)).merge_and_unload()
    # 3. save
    out = Path(out) if out is not None else target.adapter_dir / "merged"
    out.mkdir(parents=True, exist_ok=True)
    merged.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    _tokenizer(model_path, model_cfg.trust_remote_code).save_pretrained(out)
    (out / "grpo_ray_export.json").write_text(
        json.dumps({"base_model": model_cfg.name_or_path, "base_quantization": model_cfg.quantization,
                    "adapter": str(target.adapter_dir), "dtype": dtype}, indent=2)
        + "\n"
    )
    return out


def _dequantized_base(model_cfg, model_path: str) -> torch.nn.Module:
    """The base a QLoRA adapter was trained on, in float32 on the CPU: each 4-bit weight
    dequantized as the learner saw it, every other weight in the run's model.dtype.

    Loading the 4-bit base needs the GPU (bitsandbytes); the values then go into a plain float32
    model of the same config, so the merged checkpoint carries no quantization config.
    """
    quantized = load_model(model_cfg, model_path, "cuda")  # a ModelLoadError names the GPU and the extra
    from bitsandbytes.functional import dequantize_4bit

    dense = load_model(_dense_float32(model_cfg), model_path, "cpu")
    with torch.no_grad():
        dense_params = dict(dense.named_parameters())
        for name, p in quantized.named_parameters():
            value = dequantize_4bit(p.data, p.quant_state) if hasattr(p, "quant_state") else p.data
            dense_params[name].copy_(value.reshape(dense_params[name].shape).float().cpu())
    del quantized
    torch.cuda.empty_cache()
    return dense


def _dense_float32(model_cfg):
    """The same model config, loaded unquantized in float32 (what merging computes in)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(model_cfg, {"dtype": "float32", "quantization": "none"})


def _model_config(target: Target):
    """The run's `model` config, or the default one naming the adapter's base model."""
    from omegaconf import OmegaConf

    from grpo_ray.config import ModelConfig

    schema = OmegaConf.structured(ModelConfig)
    if target.run_dir is not None:
        return OmegaConf.merge(schema, OmegaConf.load(target.run_dir / "config.yaml").model)
    adapter = read_adapter_config(target.adapter_dir)
    return OmegaConf.merge(schema, {"name_or_path": adapter["base_model_name_or_path"]})


def _tokenizer(path: str, trust_remote_code: bool):
    """The base model's tokenizer as published (no pad token or padding side added for training)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {path!r}: {e}") from e
