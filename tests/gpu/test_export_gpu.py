"""`grpo-ray export --merged` from a QLoRA run: the 4-bit base dequantized plus the adapter.

The merged float32 checkpoint must give the logits of the QLoRA model itself (4-bit base + adapter,
computing in float32), not those of the unquantized base + adapter: the adapter was trained on
the dequantized weights.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("bitsandbytes")

from grpo_ray.export import export_merged  # noqa: E402
from grpo_ray.models import load_model  # noqa: E402
from tests.unit.test_export import logits, make_run  # noqa: E402


def test_qlora_merge_gives_the_logits_of_the_4bit_base_plus_adapter(vllm_model_dir, tmp_path):
    from omegaconf import OmegaConf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = make_run(vllm_model_dir, tmp_path / "run", "model.quantization=nf4", "model.dtype=float32")
    out = export_merged(run, tmp_path / "merged", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain checkpoint
    cfg = OmegaConf.load(run / "config.yaml").model
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    qlora = PeftModel.from_pretrained(load_model(cfg, str(vllm_model_dir), "cuda"), str(run / "final")).eval()
    expected = logits(qlora, ids)
    del qlora
    dense_cfg = OmegaConf.merge(cfg, {"quantization": "none"})
    unquantized = PeftModel.from_pretrained(load_model(dense_cfg, str(vllm_model_dir), "cuda"), str(run / "final")).eval()
    unquantized_gap = (logits(unquantized, ids) - expected).abs().max().item()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).cuda().eval()
    gap = (logits(merged, ids) - expected).abs().max().item()
    print(f"\nmax |logit - QLoRA logit|: merged {gap:.2e}, unquantized base + adapter {unquantized_gap:.2e}")
    assert unquantized_gap > 1e-2  # the 4-bit rounding is visible in the logits
    assert gap < 1e-3  # and the merged model carries it
