"""QLoRA colocated (cluster=single_gpu, model.quantization=nf4): the learner trains on the engine's
own 4-bit base, mapped through CUDA IPC, and the engine generates with the updated adapter.

vLLM's bitsandbytes loading keeps each linear as one uint8 tensor [bytes, 1] holding its shards
(q|k|v, gate|up, or one) back to back, `bnb_shard_offsets`, and one QuantState per shard
(../shared/DESIGN.md, "the 4-bit base shared too"). Checked:
(a) without vLLM: a layout built that way with bitsandbytes' own quantizer gives a learner whose
    logits equal those of the model with the same dequantized weights, which peft wraps with its
    4-bit LoRA layers and trains (LoRA gradients, none on the base);
(b) with vLLM in its own process: the learner built on the engine's 4-bit weights allocates no
    base, matches the engine's sampling logprobs, and after an adapter pull the engine samples
    from the learner's adapter, far from the base. Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch

pytestmark = pytest.mark.gpu
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
bnb = pytest.importorskip("bitsandbytes")

from grpo_ray.config import load_config  # noqa: E402
from grpo_ray.models import add_lora  # noqa: E402
from grpo_ray.weights import QuantizedWeight, build_on_engine_weights, open_quantized, quantized_spec  # noqa: E402

SYNC_TOL = 0.1
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
LINEARS = [*PACKED.items(), ("o_proj", ["o_proj"]), ("down_proj", ["down_proj"])]  # vLLM's linears of a layer
MLP = ("gate_up_proj", "down_proj")


def vllm_like_engine(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight], torch.nn.Module]:
    """`model`'s weights laid out as vLLM's bitsandbytes loading keeps them (fused linears' shards
    quantized one by one, NF4, blocksize 64, not nested), the same round trip `quantized_spec` and
    `open_quantized` make through CUDA IPC, and the reference: `model` with each linear's weight
    replaced by its dequantized NF4 value."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    reference = copy.deepcopy(model)  # (a model cast with .to(bf16) would also round its rotary frequencies)
    params = dict(model.named_parameters())
    tensors, quantized_params = {}, {}
    for layer in range(model.config.num_hidden_layers):
        for fused, parts in LINEARS:
            prefix = f"model.layers.{layer}.{'mlp' if fused in MLP else 'self_attn'}"
            shards = [quantize_4bit(params[f"{prefix}.{p}.weight"].detach(), blocksize=64, quant_type="nf4",
                                    compress_statistics=False, quant_storage=torch.uint8) for p in parts]  # fmt: skip
            for p, (packed, state) in zip(parts, shards):
                reference.get_submodule(f"{prefix}.{p}").weight.data.copy_(dequantize_4bit(packed, state))
            data = torch.nn.Parameter(torch.cat([packed for packed, _ in shards]), requires_grad=False)
            data.bnb_quant_state = dict(enumerate(state for _, state in shards))
            data.bnb_shard_offsets = torch.tensor([0] + [packed.shape[0] for packed, _ in shards]).cumsum(0)
            quantized_params[f"{prefix}.{fused}.base_layer.weight"] = data
            biases = [params.get(f"{prefix}.{p}.bias") for p in parts]
            if all(b is not None for b in biases):
                tensors[f"{prefix}.{fused}.base_layer.bias"] = torch.cat([b.detach() for b in biases])
    for name, p in params.items():
        if ".layers." not in name or "norm" in name:
            tensors[name] = p.detach()
    specs = {name: quantized_spec(name, p, tensors) for name, p in quantized_params.items()}
    tensors.update({name: p.data for name, p in quantized_params.items()})
    return tensors, open_quantized(specs, tensors), reference


def test_learner_on_4bit_shards_equals_the_dequantized_model_and_trains_lora(vllm_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.bfloat16).to("cuda")
    tensors, quantized, reference = vllm_like_engine(model)
    assert len(quantized) == 4 * model.config.num_hidden_layers and all(len(q.states) in (1, 2, 3) for q in quantized.values())
    learner = build_on_engine_weights(model.config, tensors, PACKED, quantized=quantized)
    layers = [m for m in learner.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * model.config.num_hidden_layers
    from bitsandbytes.functional import dequantize_4bit

    for name, module in learner.named_modules():  # each layer holds its own shard (q, k, v in order)
        if isinstance(module, bnb.nn.Linear4bit):
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(weight, reference.get_submodule(name).weight), name
    ids = torch.randint(3, model.config.vocab_size, (2, 19), device="cuda")
    with torch.no_grad():
        got, want = learner(ids).logits, reference(ids).logits
    print(f"\nlearner on 4-bit shards vs dequantized reference: max |logit diff| = {(got - want).abs().max().item():.3g}")
    assert torch.equal(got, want)  # bitsandbytes dequantizes, then the same F.linear (CPU, train mode: equal too)
    engine_storages = {q.packed.untyped_storage().data_ptr() for q in quantized.values()}
    assert all(m.weight.untyped_storage().data_ptr() in engine_storages for m in layers)  # views, not copies
    cfg = load_config(["model.lora.r=8", "model.lora.alpha=16"])
    peft_model = add_lora(learner, cfg.model.lora)
    assert type(peft_model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")).__module__.endswith("lora.bnb")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.grad is not None and p.grad.norm() > 0 for n, p in trainable.items())
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(peft_model(ids).logits, got)  # the base alone, exactly


def test_4bit_colocated_engine_generates_with_the_learners_adapter(vllm_model_dir):
    pytest.importorskip("vllm")
    from grpo_ray.actors.learner import LearnerActor
    from grpo_ray.actors.rollout import RolloutActor
    from tests.gpu.vllm_helpers import ROWS, TEMPERATURE, gaps_to_adapter_and_base, random_adapter, teacher_forced_gap

    cfg = load_config([
        f"model.name_or_path={vllm_model_dir}", "model.dtype=auto", "model.quantization=nf4", "rollout=vllm",
        "cluster=single_gpu", "rollout.num_generations=4", f"rollout.temperature={TEMPERATURE}",
        "rollout.max_prompt_length=64", "rollout.max_completion_length=24", "rollout.gpu_memory_utilization=0.1",
        "trainer.per_device_train_batch_size=8", "model.lora.r=8", "model.lora.alpha=16",
        f"rollout.enforce_eager={os.environ.get('GRPO_RAY_TEST_EAGER', 'false')}",
    ])  # fmt: skip
    engine = RolloutActor(cfg, str(vllm_model_dir), device="cuda")
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        learner = LearnerActor(cfg, str(vllm_model_dir), device="cuda", shared_weights=engine.share_weights())
        grown = torch.cuda.memory_allocated() - before
        layers = [m for m in learner.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        packed_bytes = sum(m.weight.numel() for m in layers)
        print(f"\nlearner on the engine's 4-bit base: {len(layers)} Linear4bit over {packed_bytes / 2**20:.2f} MiB of "
              f"the engine's bytes; learner allocated {grown / 2**20:.2f} MiB")  # fmt: skip
        assert layers and grown < packed_bytes
        engine.map_adapter(learner.share_adapter())
        pad_id = engine.tokenizer.pad_token_id
        with learner.model.disable_adapter():
            gap_base = teacher_forced_gap(learner.model, engine.generate(ROWS, version=0), pad_id)
        random_adapter(learner.model, seed=1)
        start = time.perf_counter()
        engine.pull_weights(1)
        took = (time.perf_counter() - start) * 1e3
        rollout = engine.generate(ROWS, version=1)
        gap, gap_to_base = gaps_to_adapter_and_base(learner.model, rollout, pad_id)
        print(f"base: |engine - learner| = {gap_base:.4f}; after the pull ({took:.2f} ms): |engine - learner| = "
              f"{gap:.4f}, |engine - base| = {gap_to_base:.4f}")  # fmt: skip
        assert gap_base < SYNC_TOL and gap < SYNC_TOL and gap_to_base > 4 * gap
        del learner, layers
    finally:
        engine.backend.close()
