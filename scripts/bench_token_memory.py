#!/usr/bin/env python
"""GPU memory a token of one long sequence costs the learner, per decoder layer's peak (issue 13).

Llama-3.1-8B layer widths (4 layers, bf16, vocabulary cut to 32000: no logits are formed), LoRA
r=16 on all linear layers (B ~ N(0, 0.01)), offloaded checkpointing, sequence chunks of 4096 tokens,
forward and backward of one sequence at 32768 and at 65536 tokens; the bytes a token = the growth of
the peak between the two lengths, so the weights and fixed costs drop out. Two rows:

  before  peft's LoRA as it comes (each adapted layer's input cast to fp32, a copy kept for backward)
          and the norms over the whole sequence: what grpo_ray did until 2026-11-30
  now     grpo_ray.models.compute_lora_in_input_dtype and the norms in sequence chunks

Also prints the loss and the relative difference of layer 1's q_proj LoRA gradients between the two.

    PYTHONPATH=. python scripts/bench_token_memory.py     # needs a CUDA GPU with ~15 GiB free
"""
import json, time
from types import SimpleNamespace
import torch
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM
from grpo_ray.checkpointing import apply_gradient_checkpointing, apply_sequence_chunking, decoder_layers
from grpo_ray.models import add_lora

CFG = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                  num_key_value_heads=8, max_position_embeddings=131072, attn_implementation="sdpa")

def build(now: bool):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(CFG).to(torch.bfloat16)
    model = add_lora(model, SimpleNamespace(r=16, alpha=32, dropout=0.0, target_modules=["all-linear"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.01)
    apply_gradient_checkpointing(model, "offload"); apply_sequence_chunking(model, 4096)
    if not now:
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.cast_input_dtype_enabled = True
                for lin in [*m.lora_A.values(), *m.lora_B.values()]:
                    del lin.forward
        for layer in decoder_layers(model):
            for c in layer.children():
                if type(c).__name__.endswith("Norm"):
                    del c.forward
    return model.train()

def step(model, L):
    ids = torch.randint(0, 32000, (1, L), device="cuda", generator=torch.Generator("cuda").manual_seed(L))
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    h = model.base_model.model.model(input_ids=ids, use_cache=False).last_hidden_state
    loss = h[..., :64].float().pow(2).mean()
    loss.backward(); torch.cuda.synchronize()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None and "layers.1.self_attn.q_proj" in n}
    model.zero_grad(set_to_none=True)
    return (torch.cuda.max_memory_allocated() - base) / 2**30, time.perf_counter() - t, loss.item(), grads

out = {}
for now in (False, True):
    model = build(now)
    step(model, 4096)  # warm-up
    rows = {L: step(model, L) for L in (32768, 65536)}
    per_token = (rows[65536][0] - rows[32768][0]) * 2**30 / 32768
    out["now" if now else "before"] = dict(peak_gib={L: round(r[0], 2) for L, r in rows.items()}, s={L: round(r[1], 2) for L, r in rows.items()},
        bytes_per_token=round(per_token), hidden_vectors_per_token=round(per_token / (4096 * 2), 2), loss=rows[32768][2])
    out.setdefault("grads", []).append(rows[32768][3])
    del model; torch.cuda.empty_cache()
g0, g1 = out.pop("grads")
out["grad_rel_diff"] = {n.split("layers.")[-1]: round(((g0[n] - g1[n]).norm() / g0[n].norm()).item(), 4) for n in g0}
print(json.dumps(out, indent=1))
