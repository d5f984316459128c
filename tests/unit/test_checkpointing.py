"""grpo_ray.checkpointing on CPU: off / on / offload give the same loss and LoRA gradients, and
offload keeps no layer input alive in the autograd graph (the host copies stand in for them)."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from grpo_ray.checkpointing import MODES, _chunked, apply_gradient_checkpointing, apply_sequence_chunking, decoder_layers
from grpo_ray.models import add_lora

LAYERS = 4


@pytest.fixture(scope="module")
def base_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip


def _lora_model(config, mode: str, chunk_tokens: int = 0) -> torch.nn.Module:
    """The same random Llama and LoRA (B non-zero, so A gets gradients too) for every mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(config), SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]))
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    model.train()
    apply_gradient_checkpointing(model, mode)
    apply_sequence_chunking(model, chunk_tokens)
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # a padded row
    return ids, mask


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids, mask = _inputs()
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    loss = (loss * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_modes_give_the_same_loss_and_lora_gradients(base_config):
    results = {mode: _loss_and_grads(_lora_model(base_config, mode)) for mode in MODES}
    loss_off, grads_off = results["off"]
    assert len(grads_off) == LAYERS * 7 * 2  # A and B of q, k, v, o, gate, up, down in every layer
    assert all(g.abs().sum() > 0 for g in grads_off.values())
    for mode in ("on", "offload"):
        loss, grads = results[mode]
        torch.testing.assert_close(loss, loss_off, rtol=1e-6, atol=1e-7, msg=mode)
        assert grads.keys() == grads_off.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads_off[name], rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")


def _layer_inputs_alive_after_forward(model) -> list[bool]:
    """Whether each decoder layer's input tensor is still referenced once the forward is done (before backward)."""
    refs: list[weakref.ref] = []
    hooks = [
        layer.register_forward_pre_hook(lambda module, args: refs.append(weakref.ref(args[0])))
        for layer in decoder_layers(model)
    ]
    ids, mask = _inputs()
    out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    gc.collect()
    alive = [r() is not None for r in refs]
    out.float().pow(2).mean().backward()  # the graph is still usable
    for hook in hooks:
        hook.remove()
    return alive


def test_on_keeps_every_layer_input_and_offload_none(base_config):
    assert _layer_inputs_alive_after_forward(_lora_model(base_config, "on")) == [True] * LAYERS
    # offload: the graph holds host copies (and a detached alias of the last input), never the inputs themselves
    assert _layer_inputs_alive_after_forward(_lora_model(base_config, "offload")) == [False] * LAYERS


def test_without_grad_layers_run_unchanged(base_config):
    ids, mask = _inputs()
    with torch.no_grad():
        expected = _lora_model(base_config, "off")(input_ids=ids, attention_mask=mask).logits
        for mode in ("on", "offload"):
            got = _lora_model(base_config, mode)(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_second_backward_through_the_same_graph_refetches_the_inputs(base_config):
    model = _lora_model(base_config, "offload")
    ids, mask = _inputs()
    loss = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().pow(2).mean()
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * first[name], rtol=1e-5, atol=1e-7, msg=name)


def test_unknown_mode_and_model_without_layers_are_refused(base_config):
    with pytest.raises(ValueError, match="trainer.gradient_checkpointing='sometimes'"):
        apply_gradient_checkpointing(torch.nn.Linear(2, 2), "sometimes")
    with pytest.raises(ValueError, match="set trainer.gradient_checkpointing=off"):
        apply_gradient_checkpointing(torch.nn.Linear(2, 2), "offload")


@pytest.mark.parametrize("mode", MODES)
def test_mlp_in_sequence_chunks_gives_the_same_loss_and_gradients(base_config, mode):
    loss_one, grads_one = _loss_and_grads(_lora_model(base_config, mode))
    loss, grads = _loss_and_grads(_lora_model(base_config, mode, chunk_tokens=5))  # 51 tokens: 11 pieces
    torch.testing.assert_close(loss, loss_one, rtol=1e-6, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_one[name], rtol=1e-5, atol=1e-7, msg=name)
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(_lora_model(base_config, mode, chunk_tokens=5)(input_ids=ids, attention_mask=mask).logits,
                                   _lora_model(base_config, mode)(input_ids=ids, attention_mask=mask).logits)  # fmt: skip


def test_chunked_mlp_keeps_no_tokens_by_intermediate_activation(base_config):
    """Without chunks autograd keeps [tokens × intermediate] tensors of every MLP; with chunks of 5
    tokens, nothing larger than the MLP's input (backward recomputes the rest, a chunk at a time)."""

    def largest_saved(chunk_tokens: int) -> int:
        model = _lora_model(base_config, "off", chunk_tokens)
        mlp = decoder_layers(model)[0].mlp
        sizes: list[int] = []
        x = torch.randn(3, 17, base_config.hidden_size, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = mlp(x)
        out.sum().backward()
        assert x.grad is not None and mlp.down_proj.lora_A.default.weight.grad is not None
        return max(sizes)

    assert largest_saved(0) >= 51 * base_config.intermediate_size
    assert largest_saved(5) <= 51 * base_config.hidden_size


@pytest.mark.parametrize("mode", MODES)
def test_chunked_mlp_runs_twice_per_chunk_not_again_in_the_layers_recomputation(base_config, mode):
    """Forward, then backward's recomputation of each chunk: a checkpointed layer's own recomputation
    stops before the MLP, so sequence chunks cost no third MLP forward."""
    model = _lora_model(base_config, mode)
    calls = []
    for layer in decoder_layers(model):
        original = layer.mlp.forward
        layer.mlp.forward = lambda x, original=original: calls.append(x.shape[-2]) or original(x)
    apply_sequence_chunking(model, 5)
    _loss_and_grads(model)  # 51 tokens: 11 chunks a layer
    assert len(calls) == LAYERS * 2 * 11, len(calls)


def test_chunks_recomputed_in_backward_replay_the_forwards_dropout(base_config):
    """LoRA dropout draws random masks: backward's recomputation draws the forward's, so the
    gradients are those of the same chunks run once with autograd keeping everything."""
    from transformers import LlamaForCausalLM

    def grads(chunked: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        lora = SimpleNamespace(r=4, alpha=8, dropout=0.5, target_modules=["all-linear"])
        mlp = decoder_layers(add_lora(LlamaForCausalLM(base_config), lora))[0].mlp.train()
        for name, p in mlp.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)  # so that A gets gradients too
        x = torch.randn(51, base_config.hidden_size, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(3)
        if chunked:
            mlp.forward = _chunked(mlp, mlp.forward, 5)
            out = mlp(x)
        else:
            out = torch.cat([mlp(piece) for piece in x.split(5)])
        out.pow(2).sum().backward()
        return {n: p.grad for n, p in mlp.named_parameters() if p.requires_grad}

    got, expected = grads(chunked=True), grads(chunked=False)
    assert all(g.abs().sum() > 0 for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_sequence_chunks_need_decoder_mlps():
    with pytest.raises(ValueError, match="set trainer.sequence_chunk_tokens=0"):
        apply_sequence_chunking(torch.nn.Linear(2, 2), 8)


def test_a_long_sequence_keeps_a_few_hidden_vectors_a_token_per_layer(base_config):
    """One bf16 decoder layer with LoRA under sequence chunks: the tensors autograd keeps for its
    backward come to under 10 hidden-size vectors a token (attention's q, k, v and output, the
    layer's inputs): 8.7 here, against 18.5 with peft's fp32 copies of the LoRA inputs and 10.9 with
    the norms' fp32 copies of the whole sequence."""
    from transformers import LlamaForCausalLM

    config = base_config.__class__(**{**base_config.to_dict(), "num_hidden_layers": 1, "attn_implementation": "sdpa"})
    model = add_lora(LlamaForCausalLM(config).to(torch.bfloat16),
                     SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]))  # fmt: skip
    apply_sequence_chunking(model, 16)
    tokens, hidden = 256, config.hidden_size
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    embeddings = model.base_model.model.model.rotary_emb(x, positions)
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = decoder_layers(model)[0](x, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
    vectors = sum(storages.values()) / (tokens * hidden * 2)
    assert 4 < vectors < 10, vectors
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
