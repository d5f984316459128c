"""grpo_ray.logprobs: padded and padding-free layouts, micro-batches by token budget, and the
log-probabilities of a batch whatever its layout (tiny random Llama, CPU, no download)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from grpo_ray.config import ConfigError
from grpo_ray.logprobs import (
    IGNORE_INDEX,
    PACKING_ATTENTION,
    check_padding_free,
    completion_logprobs,
    micro_batch_indices,
    pack,
    select_kernel,
)

PROMPTS = [[5, 6, 7], [8, 9]]
COMPLETIONS = [[10, 11], [12, 13, 14]]


def test_padded_layout_has_one_sequence_per_row():
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 10, 11], [8, 9, 12, 13, 14]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch.position_ids is None
    # row 0: tokens 10, 11 sit at 3, 4 and are predicted from 2, 3; row 1 starts at flat 5: 12 at 2 -> from 5 + 1
    assert batch.predict_index.tolist() == [[2, 3, 0], [6, 7, 8]]
    assert batch.targets.tolist() == [[10, 11, IGNORE_INDEX], [12, 13, 14]]
    assert batch.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert set(batch.model_inputs()) == {"input_ids", "attention_mask"}


def test_padding_free_layout_is_one_row_with_restarting_positions():
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, padding_free=True)
    assert batch.input_ids.tolist() == [[5, 6, 7, 10, 11, 8, 9, 12, 13, 14]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    assert batch.attention_mask.sum().item() == 10  # real tokens, as the tokens/total metric counts them
    assert batch.predict_index.tolist() == [[2, 3, 0], [6, 7, 8]]
    assert set(batch.model_inputs()) == {"input_ids", "position_ids"}


def test_micro_batches_without_a_budget_are_chunks_in_order():
    assert micro_batch_indices([5, 9, 3, 4, 12], batch_size=2, max_tokens=0, padding_free=False) == [[0, 1], [2, 3], [4]]


def test_micro_batches_by_budget_go_longest_first_and_count_padding():
    lengths = [5, 9, 3, 4, 12]
    # padded: rows × longest; 12 alone (over the budget), 9 alone (9 + 5 would be 18), then 5 + 4 = 2 × 5
    assert micro_batch_indices(lengths, batch_size=2, max_tokens=10, padding_free=False) == [[4], [1], [0, 3], [2]]
    # budget 12: padding-free counts 5 + 4 + 3 = 12 tokens, padded 3 × 5 = 15, so 3 goes on its own
    assert micro_batch_indices(lengths, batch_size=2, max_tokens=12, padding_free=True) == [[4], [1], [0, 3, 2]]
    assert micro_batch_indices(lengths, batch_size=2, max_tokens=12, padding_free=False) == [[4], [1], [0, 3], [2]]


@pytest.mark.parametrize("padding_free", [False, True])
def test_every_sequence_once_and_each_micro_batch_within_the_budget(padding_free):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (50,), generator=g).tolist()
    groups = micro_batch_indices(lengths, batch_size=8, max_tokens=64, padding_free=padding_free)
    assert sorted(i for group in groups for i in group) == list(range(50))
    for group in groups:
        tokens = sum(lengths[i] for i in group) if padding_free else len(group) * max(lengths[i] for i in group)
        assert tokens <= 64
    assert max(len(group) for group in groups) > 1


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    models = {}
    for implementation in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=implementation)
        models[implementation] = model.eval()
    return models


def _ragged(seed: int = 0, n: int = 5, vocab: int = 100) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    lengths = lambda lo, hi: [int(x) for x in torch.randint(lo, hi, (n,), generator=g)]  # noqa: E731
    prompts = [torch.randint(3, vocab, (p,), generator=g).tolist() for p in lengths(2, 9)]
    completions = [torch.randint(3, vocab, (c,), generator=g).tolist() for c in lengths(1, 12)]
    return prompts, completions


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_and_micro_batched_logprobs_equal_one_sequence_at_a_time(tiny_lm, implementation):
    model, kernel = tiny_lm[implementation], select_kernel("reference", "cpu", 16)
    prompts, completions = _ragged()
    with torch.no_grad():
        alone = [completion_logprobs(model, pack([p], [c], 0), 0.7, kernel) for p, c in zip(prompts, completions)]
        padded = completion_logprobs(model, pack(prompts, completions, 0), 0.7, kernel)
        packed = completion_logprobs(model, pack(prompts, completions, 0, padding_free=True), 0.7, kernel)
        # the packed row's sequences must not see each other: compare against the unpacked ones
        for layout in (padded, packed):
            for i, (logp, entropy) in enumerate(alone):
                length = len(completions[i])
                torch.testing.assert_close(layout[0][i, :length], logp[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(layout[1][i, :length], entropy[0], rtol=1e-5, atol=1e-5)
                assert (layout[0][i, length:] == 0).all()
    # and attending across the boundary would change them: one long sequence is not the same
    joined = pack([prompts[0] + completions[0] + prompts[1]], [completions[1]], 0)
    with torch.no_grad():
        crossed = completion_logprobs(model, joined, 0.7, kernel)[0][0]
    assert not torch.allclose(crossed, alone[1][0][0], atol=1e-3)


def test_a_micro_batch_of_one_sequence_reaches_sdpa_without_a_mask(tiny_lm, monkeypatch):
    """Long contexts go one sequence per micro-batch: SDPA must get plain causal attention, not an
    [S, S] mask (16 GiB at S = 128K), which would also rule out its flash kernel."""
    sdpa, masks = torch.nn.functional.scaled_dot_product_attention, []

    def recording(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    kernel = select_kernel("reference", "cpu", 16)
    with torch.no_grad():
        completion_logprobs(tiny_lm["sdpa"], pack(PROMPTS[:1], COMPLETIONS[:1], 0), 1.0, kernel)
        assert masks and all(mask is None for mask in masks)
        masks.clear()  # two rows of different lengths (5 and 4 tokens) do need one: the padding
        completion_logprobs(tiny_lm["sdpa"], pack(PROMPTS, [COMPLETIONS[0], COMPLETIONS[1][:2]], 0), 1.0, kernel)
    assert masks and all(mask is not None and mask.shape[-2:] == (5, 5) for mask in masks)


def test_padding_free_gradients_equal_padded_ones(tiny_lm):
    model, kernel = tiny_lm["sdpa"], select_kernel("reference", "cpu", 16)
    prompts, completions = _ragged(seed=1)
    weights = torch.randn(len(prompts), max(len(c) for c in completions), generator=torch.Generator().manual_seed(2))
    grads = []
    for padding_free in (False, True):
        model.zero_grad(set_to_none=True)
        logp, _ = completion_logprobs(model, pack(prompts, completions, 0, padding_free), 1.0, kernel)
        (logp * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_padding_free_refuses_attention_that_may_cross_sequences():
    for implementation in PACKING_ATTENTION:
        check_padding_free(SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation)), True)
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="paged|eager"))
    check_padding_free(model, False)  # not asked for: anything goes
    with pytest.raises(ConfigError, match=r"trainer.padding_free=true .*'paged\|eager'.*attn_implementation"):
        check_padding_free(model, True)
