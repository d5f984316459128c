"""`grpo-ray export <run_dir | adapter_dir> --merged [--out DIR]`: base model + LoRA adapter merged
into one plain checkpoint (safetensors + config + tokenizer) that transformers and vLLM load
without peft.

The adapter itself (PEFT format) is already in `<run>/final/`; this writes the merged model to
`<adapter>/merged/` unless `--out` says otherwise. Merging runs in float32 on the CPU (W + B·A·α/r
computed once, exactly), then the result is cast to `dtype` (bfloat16 by default).
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
    2. load the base in float32, wrap it with the adapter (peft), merge and unload;
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
    if model_cfg.quantization != "none":
        raise EvalError(
            f"model.quantization={model_cfg.quantization!r}: merging a QLoRA adapter needs the base dequantized "
            "from its 4-bit weights (GPU, bitsandbytes), which export does not do yet"
        )
    model_path = resolve_model_path(model_cfg.name_or_path)
    # 2. merge in float32 on the CPU
    from peft import PeftModel

    model_cfg.dtype = "float32"
    base = load_model(model_cfg, model_path, "cpu")
    merged = PeftModel.from_pretrained(base, str(target.adapter_dir)).merge_and_unload()
    # 3. save
    out = Path(out) if out is not None else target.adapter_dir / "merged"
    out.mkdir(parents=True, exist_ok=True)
    merged.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    _tokenizer(model_path, model_cfg.trust_remote_code).save_pretrained(out)
    (out / "grpo_ray_export.json").write_text(
        json.dumps({"base_model": model_cfg.name_or_path, "adapter": str(target.adapter_dir), "dtype": dtype}, indent=2)
        + "\n"
    )
    return out


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
