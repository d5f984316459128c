"""The Triton kernel under TRITON_INTERPRET=1 (CPU) against the reference, on small odd shapes.

Triton fixes at import time whether ``@triton.jit`` functions, its own ``tl.max`` and
``tl.sum`` included, are compiled or interpreted, and the two cannot be mixed. So the
kernel tests run in-process only when triton was imported with TRITON_INTERPRET=1 (e.g.
``TRITON_INTERPRET=1 pytest tests/unit/test_logprob.py``). In any other process (the
whole suite, where other modules may have imported triton and torch already, or the GPU
host) ``test_interpreted_suite_in_subprocess`` runs this file in a child pytest with
TRITON_INTERPRET=1 set from the start, and the in-process kernel tests are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_ray.kernels.reference import selective_logprobs


def _process_is_interpreted() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
    except ImportError:
        return False
    return type(tl.max).__name__ == "InterpretedFunction"


IN_INTERPRETER = _process_is_interpreted()


@pytest.mark.skipif(IN_INTERPRETER, reason="already inside the interpreter")
def test_interpreted_suite_in_subprocess():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve()),
        "-k", "not test_interpreted_suite_in_subprocess and not test_compiled_module_refuses_cpu_tensors",
    ]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # Every kernel test ran (none skipped), test_kernels_are_interpreted among them.
    assert " passed" in out and "skipped" not in out, out[-3000:]


@pytest.fixture
def lp(monkeypatch):
    """The kernel module (interpreted), with small tiles and chunks so every loop runs several times."""
    if not IN_INTERPRETER:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess (test_interpreted_suite_in_subprocess)")
    from grpo_ray.kernels import logprob as module

    monkeypatch.setattr(module, "FWD_BLOCK_V", 32)
    monkeypatch.setattr(module, "ELEM_BLOCK", 16)
    monkeypatch.setattr(module, "MIN_CHUNK", 1)
    monkeypatch.setattr(module, "MAX_CHUNK", 8192)
    monkeypatch.setattr(module, "PROGRAMS_PER_SM", 0)
    return module


def _set_chunk(monkeypatch, module, rows, v, dtype):
    monkeypatch.setattr(module, "SCRATCH_BYTES", rows * v * torch.empty((), dtype=dtype).element_size())


def _inputs(n, v, h, dtype, seed=0, ignore=(), ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (3.0 / h**0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        targets[i] = ignore_index
    return hidden.to(dtype), weight.to(dtype), targets, torch.randn(n, generator=g), torch.randn(n, generator=g)


def _run(fn, hidden, weight, targets, gl, ge, train_weight, use_logp=True, use_entropy=True, **kw):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(train_weight)
    logp, entropy = fn(hidden, weight, targets, **kw)
    loss = 0.0
    if use_logp:
        loss = loss + (logp * gl).sum()
    if use_entropy:
        loss = loss + (entropy * ge).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), hidden.grad, weight.grad if train_weight else None


def _close(got, exp, dtype, names=("logp", "entropy", "d_hidden", "d_weight")):
    # fp32: same math in another order. Half: the kernel and the reference both round the
    # logits and the gradients to the input dtype, not always the same way (1-2 ulp).
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    for name, a, b in zip(names, got, exp):
        if a is None and b is None:
            continue
        assert a is not None and b is not None, name
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype)
        torch.testing.assert_close(a.float(), b.float(), msg=name, **tol)


def test_kernels_are_interpreted(lp):
    assert lp._interpreted()
    for name in ("_logprob_fwd_kernel", "_logprob_bwd_logits_kernel", "_hidden_grad_kernel"):
        assert type(getattr(lp, name)).__name__ == "InterpretedFunction", name


# (N, V, H, chunk rows, temperature): V spans several 32-wide tiles with a remainder,
# chunks do not divide N.
CASES = [
    (13, 101, 24, 4, 0.7),
    (7, 37, 9, 3, 1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("n,v,h,chunk,temperature", CASES)
def test_matches_reference(lp, monkeypatch, n, v, h, chunk, temperature, train_weight, dtype):
    _set_chunk(monkeypatch, lp, chunk, v, dtype)
    hidden, weight, targets, gl, ge = _inputs(n, v, h, dtype, ignore=(1, n - 1))
    got = _run(lp.fused_selective_logprobs, hidden, weight, targets, gl, ge, train_weight, temperature=temperature)
    exp = _run(selective_logprobs, hidden, weight, targets, gl, ge, train_weight, temperature=temperature, chunk_size=5)
    _close(got, exp, dtype)
    assert torch.all(got[0][[1, n - 1]] == 0) and torch.all(got[2][[1, n - 1]] == 0)


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_persistent_row_grid(lp, monkeypatch, entropy_grad):
    """PROGRAMS_PER_SM > 0: fewer programs than rows, each looping over several rows."""
    monkeypatch.setattr(lp, "PROGRAMS_PER_SM", 3)
    _set_chunk(monkeypatch, lp, 8, 71, torch.float32)
    hidden, weight, targets, gl, ge = _inputs(10, 71, 14, torch.float32, seed=6, ignore=(5,))
    assert lp._row_grid(8, hidden.device) == (3,)
    got = _run(lp.fused_selective_logprobs, hidden, weight, targets, gl, ge, False,
               use_entropy=entropy_grad, temperature=0.8, entropy_grad=entropy_grad)
    exp = _run(selective_logprobs, hidden, weight, targets, gl, ge, False, use_entropy=entropy_grad, temperature=0.8)
    _close(got, exp, torch.float32)


@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_one_output_in_the_loss(lp, monkeypatch, which, train_weight):
    _set_chunk(monkeypatch, lp, 3, 53, torch.float32)
    hidden, weight, targets, gl, ge = _inputs(8, 53, 11, torch.float32, seed=1, ignore=(2,))
    kw = dict(use_logp=which == "logp", use_entropy=which == "entropy", temperature=1.3)
    got = _run(lp.fused_selective_logprobs, hidden, weight, targets, gl, ge, train_weight, **kw)
    exp = _run(selective_logprobs, hidden, weight, targets, gl, ge, train_weight, **kw)
    _close(got, exp, torch.float32)


def test_entropy_as_metric_only(lp, monkeypatch):
    """entropy_grad=False: entropy values without a graph; the hidden gradient is logp's."""
    _set_chunk(monkeypatch, lp, 4, 45, torch.float32)
    hidden, weight, targets, gl, ge = _inputs(9, 45, 10, torch.float32, seed=2, ignore=(0,))
    h = hidden.clone().requires_grad_(True)
    logp, entropy = lp.fused_selective_logprobs(h, weight, targets, 0.9, entropy_grad=False)
    assert logp.requires_grad and not entropy.requires_grad
    (logp * gl).sum().backward()
    exp = _run(selective_logprobs, hidden, weight, targets, gl, ge, False, use_entropy=False, temperature=0.9)
    _close((logp.detach(), entropy, h.grad), exp[:3], torch.float32)
    logp2, none = lp.fused_selective_logprobs(hidden, weight, targets, 0.9, return_entropy=False)
    assert none is None
    torch.testing.assert_close(logp2, exp[0], atol=2e-5, rtol=2e-5)


def test_custom_ignore_index_and_int32_targets(lp, monkeypatch):
    _set_chunk(monkeypatch, lp, 2, 30, torch.float32)
    hidden, weight, targets, gl, ge = _inputs(5, 30, 6, torch.float32, seed=3, ignore=(0, 3), ignore_index=-1)
    got = _run(lp.fused_selective_logprobs, hidden, weight, targets.int(), gl, ge, True, ignore_index=-1)
    exp = _run(selective_logprobs, hidden, weight, targets, gl, ge, True, ignore_index=-1)
    _close(got, exp, torch.float32)


def test_non_contiguous_inputs(lp, monkeypatch):
    """A strided hidden (every other column of a wider tensor) and a column-major weight."""
    _set_chunk(monkeypatch, lp, 4, 33, torch.float32)
    hidden, weight, targets, gl, ge = _inputs(6, 33, 8, torch.float32, seed=4)
    wide = torch.randn(6, 16)
    wide[:, ::2] = hidden
    hidden_view = wide[:, ::2]
    weight_cm = weight.t().contiguous().t()
    assert not hidden_view.is_contiguous() and not weight_cm.is_contiguous()
    got = _run(lp.fused_selective_logprobs, hidden_view, weight_cm, targets, gl, ge, True)
    exp = _run(selective_logprobs, hidden, weight, targets, gl, ge, True)
    _close(got, exp, torch.float32)


@pytest.mark.parametrize("train_weight", [False, True])
def test_empty_batch(lp, train_weight):
    hidden, weight, targets, gl, ge = _inputs(0, 19, 5, torch.float32)
    logp, entropy, dh, dw = _run(lp.fused_selective_logprobs, hidden, weight, targets, gl, ge, train_weight)
    assert logp.shape == (0,) and entropy.shape == (0,) and logp.dtype == torch.float32
    assert dh.shape == (0, 5)
    if train_weight:
        assert dw.shape == (19, 5) and torch.all(dw == 0)


def test_no_grad_forward(lp, monkeypatch):
    _set_chunk(monkeypatch, lp, 3, 40, torch.bfloat16)
    hidden, weight, targets, _, _ = _inputs(7, 40, 12, torch.bfloat16, seed=5, ignore=(6,))
    with torch.no_grad():
        got = lp.fused_selective_logprobs(hidden.requires_grad_(True), weight, targets, 0.8)
        exp = selective_logprobs(hidden, weight, targets, 0.8)
    assert not got[0].requires_grad
    _close(got, exp, torch.bfloat16, names=("logp", "entropy"))


def test_errors(lp):
    hidden, weight, targets, _, _ = _inputs(4, 10, 3, torch.float32)
    with pytest.raises(ValueError, match="targets must be"):
        lp.fused_selective_logprobs(hidden, weight, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(TypeError):
        lp.fused_selective_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError):
        lp.fused_selective_logprobs(hidden, weight[:, :2], targets)
    with pytest.raises(ValueError):
        lp.fused_selective_logprobs(hidden, weight, targets, temperature=0.0)
    # Precompute path (frozen weight, entropy as a metric): dh is written over the buffer
    # kept from forward, so a second backward through the same graph is refused.
    h = hidden.clone().requires_grad_(True)
    logp, _ = lp.fused_selective_logprobs(h, weight, targets, entropy_grad=False)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        logp.sum().backward()
    # Recompute path: retain_graph works and gives the same gradient twice.
    h = hidden.clone().requires_grad_(True)
    logp, entropy = lp.fused_selective_logprobs(h, weight, targets)
    (logp.sum() + entropy.sum()).backward(retain_graph=True)
    first = h.grad.clone()
    (logp.sum() + entropy.sum()).backward()
    torch.testing.assert_close(h.grad, 2 * first)


def test_compiled_module_refuses_cpu_tensors():
    """Without the interpreter the public module points CPU callers to the reference."""
    pytest.importorskip("triton")
    if IN_INTERPRETER:
        pytest.skip("the whole process runs with TRITON_INTERPRET=1")
    from grpo_ray.kernels import logprob

    if logprob._interpreted():
        pytest.skip("the kernel module was imported under TRITON_INTERPRET=1")
    hidden, weight, targets, _, _ = _inputs(3, 10, 4, torch.float32)
    with pytest.raises(RuntimeError, match="reference"):
        logprob.fused_selective_logprobs(hidden, weight, targets)
