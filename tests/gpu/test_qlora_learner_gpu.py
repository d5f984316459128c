"""QLoRA learner on CUDA: a step with offloaded, plain or no gradient checkpointing, and with micro-batches
by token budget (padded or padding-free), gives the loss and LoRA gradients of one plain pass; and
offloading keeps activation memory from growing with the number of layers.

A small Llama (H = 256, 4 layers, V = 32,000) saved to disk and loaded through the learner's own path,
model.quantization=nf4 (bitsandbytes NF4 with double quantization, bf16 compute), LoRA r = 8 on all
linear layers with B non-zero (the same values in every learner), so A gets gradients too. β > 0 so
the loss depends on the logps; gradients are read in an optimizer pre-step hook, before the update
and unclipped. Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grpo_ray.actors.learner import LearnerActor
from grpo_ray.checkpointing import apply_gradient_checkpointing
from grpo_ray.config import load_config
from grpo_ray.models import add_lora
from grpo_ray.types import Rollout, ScoredRollout
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.gpu

VOCAB, HIDDEN, LAYERS = 32_000, 256, 4
B, G = 2, 4  # prompts, generations per prompt
BUDGET = 96  # tokens per micro-batch; sequences here are 6..84 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """build_tiny_model's tokenizer and chat template; a wider, 4-layer Llama with a 32K vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("qlora-llama"))
    config = LlamaConfig.from_pretrained(path)
    config.update(dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=HIDDEN // 4, initializer_range=0.08,
                       tie_word_embeddings=False))  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _scored_rollout(seed: int = 0) -> ScoredRollout:
    """B groups of G completions with ragged lengths (1..63 tokens) and random advantages."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    prompt_ids = [torch.randint(3, VOCAB, (rand(5, 21),), generator=g).tolist() for _ in range(B)]
    completion_ids = [torch.randint(3, VOCAB, (rand(1, 64),), generator=g).tolist() for _ in range(B * G)]
    rollout = Rollout(
        prompts=["p"] * B, prompt_ids=prompt_ids, completion_ids=completion_ids, completions=[""] * (B * G),
        sampling_logprobs=[[-10.0] * len(c) for c in completion_ids], finish_reasons=["stop"] * (B * G),
        columns={}, num_generations=G, version=0,
    )  # fmt: skip
    rewards = torch.zeros(B * G)
    return ScoredRollout(rollout, ["r"], rewards[:, None], rewards, torch.randn(B * G, generator=g))


def _learner(model_dir: Path, *overrides: str) -> LearnerActor:
    cfg = load_config([
        f"model.name_or_path={model_dir}", "model.dtype=auto", "model.quantization=nf4", "model.lora.r=8", "loss.beta=0.04",
        "loss.importance_sampling_correction=false", f"rollout.num_generations={G}", "rollout.temperature=0.8",
        "rollout.max_completion_length=64", f"trainer.per_device_train_batch_size={B * G}",
        "trainer.max_grad_norm=1e9", "trainer.sync_check_tolerance=1e9", "trainer.lr=1e-3", *overrides,
    ])  # fmt: skip
    learner = LearnerActor(cfg, str(model_dir), device="cuda")
    gen = torch.Generator().manual_seed(1)
    for name, p in sorted(learner.model.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return learner


def _step(model_dir: Path, *overrides: str) -> dict:
    """One train_step; the metrics, the LoRA gradients, the number of micro-batches and the peak memory."""
    learner = _learner(model_dir, *overrides)
    scored = _scored_rollout()
    grads: dict[str, torch.Tensor] = {}

    def capture(optimizer, args, kwargs):
        grads.update({n: p.grad.detach().float().clone() for n, p in learner.model.named_parameters() if p.requires_grad})

    learner.optimizer.register_step_pre_hook(capture)
    micro_batches = len(learner._micro_batches(scored))
    metrics = learner.train_step(scored).metrics
    out = {"metrics": metrics, "grads": grads, "micro_batches": micro_batches, "model": learner.model}
    del learner
    torch.cuda.empty_cache()
    return out


VARIANTS = {
    "off": [],
    "on": ["trainer.gradient_checkpointing=on"],
    "offload": ["trainer.gradient_checkpointing=offload"],
    "offload+budget": ["trainer.gradient_checkpointing=offload", f"trainer.max_tokens_per_microbatch={BUDGET}"],
    "offload+budget+padding_free": ["trainer.gradient_checkpointing=offload",
                                    f"trainer.max_tokens_per_microbatch={BUDGET}", "trainer.padding_free=true"],
    "offload+sequence_chunks": ["trainer.gradient_checkpointing=offload", "trainer.sequence_chunk_tokens=16"],
    # fp32 compute (model.dtype=float32: the 4-bit base dequantized to fp32): the reference for bf16 rounding
    "offload@fp32": ["trainer.gradient_checkpointing=offload", "model.dtype=float32"],
    "offload+sequence_chunks@fp32": ["trainer.gradient_checkpointing=offload", "trainer.sequence_chunk_tokens=16",
                                     "model.dtype=float32"],
}  # fmt: skip
for _name in ("offload+budget", "offload+budget+padding_free"):  # their fp32 twins
    VARIANTS[f"{_name}@fp32"] = [*VARIANTS[_name], "model.dtype=float32"]


@pytest.fixture(scope="module")
def steps(model_dir) -> dict[str, dict]:
    pytest.importorskip("bitsandbytes")
    return {name: _step(model_dir, *overrides) for name, overrides in VARIANTS.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _errors(label: str, got: dict, ref: dict) -> dict[str, float]:
    names = sorted(ref["grads"])
    assert sorted(got["grads"]) == names and names
    flat = lambda grads: torch.cat([grads[n].flatten() for n in names])  # noqa: E731
    err = {
        "loss_abs": abs(got["metrics"]["loss"] - ref["metrics"]["loss"]),
        "kl_abs": abs(got["metrics"]["kl"] - ref["metrics"]["kl"]),
        "grad_rel": _rel(flat(got["grads"]), flat(ref["grads"])),
        "grad_rel_worst_tensor": max(_rel(got["grads"][n], ref["grads"][n]) for n in names),
    }
    print(f"{label}: " + " ".join(f"{k}={v:.2e}" for k, v in err.items()))
    return err


def test_the_learner_trains_lora_on_a_4bit_base(steps):
    import bitsandbytes as bnb

    model = steps["off"]["model"]
    base = model.get_base_model()
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == LAYERS * 7  # q, k, v, o, gate, up, down
    weight = quantized[0].weight
    assert weight.quant_type == "nf4" and weight.compress_statistics  # double quantization
    assert quantized[0].compute_dtype == torch.bfloat16
    # nothing was upcast to fp32: embeddings, norms and lm_head stay bf16 (the loss kernel reads lm_head as is)
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in base.named_parameters() if "lora_" not in n and p.dtype.is_floating_point} == {torch.bfloat16}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    m = steps["off"]["metrics"]
    assert abs(m["kl"]) > 1e-6 and m["grad_norm"] > 0
    assert all(g.norm() > 0 for g in steps["off"]["grads"].values())


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_checkpointing_gives_the_step_without_it(steps, mode):
    err = _errors(f"{mode} vs off", steps[mode], steps["off"])
    # the recomputation runs the same kernels on the same values: equal up to nondeterministic reductions
    assert err["loss_abs"] < 1e-4 and err["kl_abs"] < 1e-4
    assert err["grad_rel"] < 1e-2


def _as_close_to_fp32_as_one_pass(steps: dict[str, dict], name: str) -> None:
    """`name` in bf16 is as close to the fp32 one-pass step as the bf16 one-pass step is (within 2×).

    bf16 LoRA compute rounds differently on other shapes (H200, micro-batches of ≤ 96 tokens: KL
    7.9e-3 from the one-pass step), so the bf16 gap is measured against fp32, where shapes change
    nothing: the gap must be bf16's, not the variant's."""
    one_pass = _errors("bf16 one pass vs fp32", steps["offload"], steps["offload@fp32"])
    variant = _errors(f"bf16 {name} vs fp32", steps[name], steps["offload@fp32"])
    for key in ("loss_abs", "kl_abs", "grad_rel"):
        assert variant[key] <= 2 * one_pass[key] + 1e-6, key


def test_mlp_in_sequence_chunks_gives_the_one_pass_step(steps):
    # fp32 compute: chunks change only the matmuls' shapes, so the step is the one-pass step
    err = _errors("fp32: offload+sequence_chunks vs one pass", steps["offload+sequence_chunks@fp32"], steps["offload@fp32"])
    assert err["loss_abs"] < 1e-4 and err["kl_abs"] < 1e-4 and err["grad_rel"] < 1e-3
    _as_close_to_fp32_as_one_pass(steps, "offload+sequence_chunks")


@pytest.mark.parametrize("variant", ["offload+budget", "offload+budget+padding_free"])
def test_micro_batches_by_token_budget_give_the_one_pass_step(steps, variant):
    assert steps["offload"]["micro_batches"] == 1 and steps[variant]["micro_batches"] >= 3
    err = _errors(f"fp32: {variant} vs one pass", steps[f"{variant}@fp32"], steps["offload@fp32"])
    assert err["loss_abs"] < 1e-4 and err["kl_abs"] < 1e-4 and err["grad_rel"] < 1e-3
    _as_close_to_fp32_as_one_pass(steps, variant)


def _activation_peak(layers: int, mode: str, tokens: int, hidden: int) -> int:
    """Bytes above the model's own memory at the peak of one forward + backward over one sequence."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo_ray.config import LoraConfig

    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=tokens)  # fmt: skip
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(config).to("cuda", torch.bfloat16), LoraConfig(r=8))
    model.train()
    apply_gradient_checkpointing(model, mode)
    ids = torch.randint(0, 1024, (1, tokens), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    hidden_states = model.get_base_model().model(input_ids=ids, use_cache=False).last_hidden_state
    hidden_states.float().pow(2).mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del model, hidden_states
    torch.cuda.empty_cache()
    return peak


def test_offload_keeps_activation_memory_flat_in_the_number_of_layers():
    tokens, hidden = 16_384, 1024
    layer_input = tokens * hidden * 2  # one bf16 [tokens, H] tensor: 32 MiB
    _activation_peak(2, "offload", tokens, hidden)  # cuBLAS workspaces, pinned host blocks: allocated once, before
    peaks = {(mode, n): _activation_peak(n, mode, tokens, hidden) for mode, n in
             [("on", 4), ("on", 16), ("offload", 4), ("offload", 16)]}  # fmt: skip
    print({k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()})
    # on: one more kept input per layer; offload: at most two inputs on the device, whatever the depth
    assert peaks[("on", 16)] - peaks[("on", 4)] > 0.8 * 12 * layer_input
    assert peaks[("offload", 16)] - peaks[("offload", 4)] < 1.0 * layer_input
    assert peaks[("on", 16)] - peaks[("offload", 16)] > 0.8 * 14 * layer_input
