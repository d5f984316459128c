"""The chunked reference against a direct log_softmax over the full logits (CPU, small shapes)."""

from __future__ import annotations

import pytest
import torch

from grpo_ray.kernels.reference import selective_logprobs


def _direct(hidden, weight, targets, temperature, ignore_index=-100):
    """Full [N, V] logits, log_softmax, gather: the obvious implementation."""
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp * valid, entropy * valid


def _inputs(n, v, h, dtype, seed=0, ignore=(), ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    # Logit spread of a few nats, like a trained lm_head, so the softmax is neither flat nor one-hot.
    weight = torch.randn(v, h, generator=g) * (2.5 / h**0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        targets[i] = ignore_index
    grad_logp = torch.randn(n, generator=g)
    grad_entropy = torch.randn(n, generator=g)
    return hidden.to(dtype), weight.to(dtype), targets, grad_logp, grad_entropy


def _run(fn, hidden, weight, targets, grad_logp, grad_entropy, **kw):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    logp, entropy = fn(hidden, weight, targets, **kw)
    loss = (logp * grad_logp).sum() + (entropy * grad_entropy).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), hidden.grad, weight.grad


# (N, V, H, chunk_size, temperature): odd sizes, chunks smaller than N and not dividing it.
SHAPES = [
    (7, 37, 13, 3, 1.0),
    (17, 101, 29, 5, 0.6),
    (5, 64, 8, 1024, 1.7),
    (1, 11, 3, 1, 1.0),
]


@pytest.mark.parametrize("n,v,h,chunk,temperature", SHAPES)
def test_fp32_values_and_grads(n, v, h, chunk, temperature):
    hidden, weight, targets, gl, ge = _inputs(n, v, h, torch.float32, ignore=(0,) if n > 2 else ())
    ref = _run(selective_logprobs, hidden, weight, targets, gl, ge, temperature=temperature, chunk_size=chunk)
    exp = _run(_direct, hidden, weight, targets, gl, ge, temperature=temperature)
    for name, a, b in zip(("logp", "entropy", "d_hidden", "d_weight"), ref, exp):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)
    assert ref[0].dtype == torch.float32 and ref[1].dtype == torch.float32


def test_fp32_matches_float64_truth():
    """fp32 reference within fp32 rounding of a float64 computation."""
    hidden, weight, targets, gl, ge = _inputs(9, 53, 21, torch.float32, seed=3)
    ref = _run(selective_logprobs, hidden, weight, targets, gl, ge, temperature=0.8, chunk_size=4)
    truth = _run(_direct, hidden.double(), weight.double(), targets, gl.double(), ge.double(), temperature=0.8)
    for name, a, b in zip(("logp", "entropy", "d_hidden", "d_weight"), ref, truth):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    """Half-precision inputs: fp32 outputs, grads in the input dtype, close to the fp32 truth."""
    n, v, h = 11, 97, 24
    hidden, weight, targets, gl, ge = _inputs(n, v, h, dtype, seed=1, ignore=(4,))
    ref = _run(selective_logprobs, hidden, weight, targets, gl, ge, temperature=0.7, chunk_size=4)
    same = _run(_direct, hidden, weight, targets, gl, ge, temperature=0.7)
    truth = _run(_direct, hidden.float(), weight.float(), targets, gl, ge, temperature=0.7)
    assert ref[0].dtype == torch.float32 and ref[1].dtype == torch.float32
    assert ref[2].dtype == dtype and ref[3].dtype == dtype
    # Same arithmetic as the direct version in the same dtype (chunking changes nothing).
    for name, a, b in zip(("logp", "entropy", "d_hidden", "d_weight"), ref, same):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=name)
    # And within half-precision rounding of the fp32 computation on the same inputs.
    for name, a, b in zip(("logp", "entropy", "d_hidden", "d_weight"), ref, truth):
        rel = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)
        assert rel < 2e-2, (name, rel.item())


def test_ignore_index_rows_are_zero_and_get_no_gradient():
    n, v, h = 9, 41, 10
    ignore = (0, 4, 8)
    hidden, weight, targets, gl, ge = _inputs(n, v, h, torch.float32, seed=2, ignore=ignore, ignore_index=-1)
    logp, entropy, dh, dw = _run(
        selective_logprobs, hidden, weight, targets, gl, ge, chunk_size=4, ignore_index=-1
    )
    for i in ignore:
        assert logp[i] == 0 and entropy[i] == 0
        assert torch.all(dh[i] == 0)
    # The other rows are what they would be without the ignored ones.
    keep = [i for i in range(n) if i not in ignore]
    sub = _run(selective_logprobs, hidden[keep], weight, targets[keep], gl[keep], ge[keep], ignore_index=-1)
    torch.testing.assert_close(logp[keep], sub[0])
    torch.testing.assert_close(entropy[keep], sub[1])
    torch.testing.assert_close(dh[keep], sub[2])
    torch.testing.assert_close(dw, sub[3], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_each_output_alone_contributes_its_gradient(which):
    hidden, weight, targets, gl, ge = _inputs(6, 29, 7, torch.float32, seed=5)
    zero = torch.zeros_like(gl)
    args = (gl, zero) if which == "logp" else (zero, ge)
    ref = _run(selective_logprobs, hidden, weight, targets, *args, temperature=1.3, chunk_size=4)
    exp = _run(_direct, hidden, weight, targets, *args, temperature=1.3)
    torch.testing.assert_close(ref[2], exp[2], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ref[3], exp[3], atol=2e-5, rtol=2e-5)
    assert ref[2].abs().sum() > 0


def test_empty_batch():
    hidden, weight, targets, gl, ge = _inputs(0, 13, 5, torch.float32)
    logp, entropy, dh, dw = _run(selective_logprobs, hidden, weight, targets, gl, ge)
    assert logp.shape == (0,) and entropy.shape == (0,)
    assert logp.dtype == torch.float32
    assert dh.shape == (0, 5) and torch.all(dw == 0)
    with torch.no_grad():
        logp, entropy = selective_logprobs(hidden, weight, targets)
    assert logp.shape == (0,) and entropy.shape == (0,)


def test_no_grad_needs_no_graph():
    hidden, weight, targets, _, _ = _inputs(5, 17, 6, torch.float32)
    hidden.requires_grad_(True)
    with torch.no_grad():
        logp, entropy = selective_logprobs(hidden, weight, targets, chunk_size=2)
    assert not logp.requires_grad and not entropy.requires_grad
    exp = _direct(hidden.detach(), weight, targets, 1.0)
    torch.testing.assert_close(logp, exp[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "shapes",
    [((4, 8), (10, 8), (5,)), ((4, 8), (10, 7), (4,)), ((4, 8, 1), (10, 8), (4,))],
)
def test_shape_errors(shapes):
    h, w, t = shapes
    with pytest.raises(ValueError):
        selective_logprobs(torch.randn(*h), torch.randn(*w), torch.zeros(*t, dtype=torch.long))


def test_bad_temperature_and_chunk():
    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError):
        selective_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError):
        selective_logprobs(h, w, t, chunk_size=0)
