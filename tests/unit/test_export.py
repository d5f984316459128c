"""`grpo-ray export --merged`: the merged checkpoint gives the logits of base + adapter."""

from __future__ import annotations

import json

import pytest
import torch

from grpo_ray.cli import main
from grpo_ray.config import load_config
from grpo_ray.evaluate import EvalError
from grpo_ray.export import export_merged
from grpo_ray.models import ModelLoadError
from tests.conftest import write_run


def make_run(model_dir, run_dir, *overrides: str):
    """A finished run's folder: config.yaml and a final/ adapter with non-zero B (so it changes logits)."""
    cfg = load_config([f"model.name_or_path={model_dir}", "model.lora.r=4", "model.lora.alpha=8", *overrides])
    return write_run(cfg, model_dir, run_dir, seed=1, std=0.3)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    return make_run(tiny_model_dir, tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, run_dir):
    """Logits of base + adapter through peft, and of the base alone, on a fixed batch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_logits = logits(base, ids)
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "final")).eval()
    return ids, logits(peft_model, ids), base_logits


def test_merged_float32_model_gives_the_logits_of_base_plus_adapter(tiny_model_dir, run_dir, reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, expected, base_logits = reference
    out = export_merged(run_dir, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=1e-5)
    assert (expected - base_logits).abs().max() > 0.1  # the adapter does change the model
    # the tokenizer travels with it, as published (chat template included)
    text = [{"role": "user", "content": "What is 2+2?"}]
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(text) == original.apply_chat_template(text)


def test_cli_export_defaults_to_bfloat16_in_final_merged(run_dir, reference, capsys):
    from transformers import AutoModelForCausalLM

    ids, expected, _ = reference
    assert main(["export", str(run_dir), "--merged"]) == 0
    out = run_dir / "final" / "merged"
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(merged.parameters()).dtype == torch.bfloat16
    # bf16 weights: ~3 significant digits
    torch.testing.assert_close(logits(merged, ids), expected, atol=0.05, rtol=0.05)


def test_export_of_a_bare_adapter_finds_its_base_model(run_dir, reference, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    ids, expected, _ = reference
    adapter = shutil.copytree(run_dir / "final", tmp_path / "adapter", ignore=shutil.ignore_patterns("merged"))
    out = export_merged(adapter, dtype="float32")  # base from adapter_config.json
    assert out == adapter / "merged"
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the QLoRA merge runs: tests/gpu/test_export_gpu.py")
def test_export_of_a_qlora_run_without_a_gpu_names_what_it_needs(tiny_model_dir, tmp_path):
    run = make_run(tiny_model_dir, tmp_path / "qlora", "model.quantization=nf4")
    with pytest.raises(ModelLoadError, match=r"model.quantization=nf4 \(QLoRA\) needs a CUDA device"):
        export_merged(run)
    assert not (run / "final" / "merged").exists()


def test_export_refuses_a_folder_without_adapter(tmp_path):
    with pytest.raises(EvalError, match="neither a run directory"):
        export_merged(tmp_path)
