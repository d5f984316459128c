"""grpo_ray.weights: the adapter's order and values, NCCL buckets, the learner's model on the
engine's weights (views, no copy), the engine's IPC/NCCL write paths, and which path a config picks.

CUDA IPC itself needs a GPU (tests/gpu/test_colocate_gpu.py); here the engine's tensors are
plain CPU tensors laid out as vLLM lays them out, which is what the view-building logic sees.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from grpo_ray import weights as w
from grpo_ray.actors import vllm_backend as vb
from grpo_ray.config import ConfigError, load_config, weight_sync_path
from tests.conftest import run_ranks
from tests.unit.test_vllm_backend import LAYOUT, PACKED, FakeEngine, peft_tensors


# --- adapter order and values ------------------------------------------------------------------


def test_adapter_pairs_sort_by_module_and_pair_a_with_b():
    names = ["base_model.model.m.z.lora_B.weight", "base_model.model.m.a.lora_B.weight",
             "base_model.model.m.z.lora_A.weight", "base_model.model.m.a.lora_A.weight"]  # fmt: skip
    assert w.adapter_pairs(names) == [
        ("m.a", "base_model.model.m.a.lora_A.weight", "base_model.model.m.a.lora_B.weight"),
        ("m.z", "base_model.model.m.z.lora_A.weight", "base_model.model.m.z.lora_B.weight"),
    ]
    with pytest.raises(ValueError, match="m.a lacks its lora_B"):
        w.adapter_pairs(names[2:])


def test_engine_values_scale_b_and_cast():
    tensors = peft_tensors(r=4)
    values = w.engine_values(tensors, 2.5, torch.bfloat16)
    first, a, b = w.adapter_pairs(tensors)[0]
    assert len(values) == len(tensors) and all(v.dtype == torch.bfloat16 for v in values)
    assert torch.equal(values[0], tensors[a].bfloat16()) and torch.equal(values[1], (tensors[b] * 2.5).bfloat16())


# --- NCCL buckets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "numels, bucket, expected",
    [([3, 3, 3], 6, [(0, 2), (2, 3)]), ([10, 1], 4, [(0, 1), (1, 2)]), ([1, 1, 1], 100, [(0, 3)]), ([], 5, [])],
)
def test_bucket_ranges_fill_buckets_in_order_and_let_big_tensors_go_alone(numels, bucket, expected):
    assert w.bucket_ranges(numels, bucket) == expected


class Wire:
    """An in-process broadcast: the sender's buckets queue up, the receiver's buffers take them in order."""

    def __init__(self):
        self.sent: list[torch.Tensor] = []

    def broadcast(self, tensor, src):
        if src == 0 and not hasattr(self, "receiving"):
            self.sent.append(tensor.clone())
        else:
            tensor.copy_(self.sent.pop(0))


def test_buckets_sent_are_received_as_the_same_tensors():
    tensors = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2), torch.randn(40)]
    shapes = [list(t.shape) for t in tensors]
    wire = Wire()
    buckets, views = w.bucket_buffers(shapes, torch.float32, "cpu", bucket_numel=24)
    assert [b.numel() for b in buckets] == [22, 8, 40]  # 15+7 | 8 | 40 alone
    torch._foreach_copy_(views, tensors)
    w.broadcast_buckets(buckets, wire)
    wire.receiving = True
    received_buckets, received = w.bucket_buffers(shapes, torch.float32, "cpu", bucket_numel=24)
    w.broadcast_buckets(received_buckets, wire)
    assert all(torch.equal(a, b) for a, b in zip(tensors, received)) and len(received) == 4 and not wire.sent


def test_bucket_views_alias_their_buckets():  # a copy into the views is what the broadcast sends
    buckets, views = w.bucket_buffers([[2, 3], [4]], torch.bfloat16, "cpu", bucket_numel=100)
    views[1].fill_(7)
    assert len(buckets) == 1 and buckets[0][6:].eq(7).all() and views[0].shape == (2, 3)


def test_adapter_copy_writes_a_and_scaled_b_each_call():
    src_a, src_b = [torch.randn(2, 3)], [torch.randn(3, 2)]
    dst_a, dst_b = [torch.zeros(2, 3, dtype=torch.bfloat16)], [torch.zeros(3, 2, dtype=torch.bfloat16)]
    copy = w.AdapterCopy(dst_a, src_a, dst_b, src_b, 2.5)
    for _ in range(2):  # the sources change in place between calls (the optimizer step)
        copy()
        assert torch.equal(dst_a[0], src_a[0].bfloat16()) and torch.equal(dst_b[0], (src_b[0] * 2.5).bfloat16())
        src_a[0].add_(1.0)
        src_b[0].mul_(-1.0)


def _gloo_rank(rank: int, port: int, queue, world_size: int = 2) -> None:
    """One rank of a real broadcast over torch.distributed (gloo), as NCCL would run it: rank 0
    the learner, the others rollout engines; two steps through the same buffers."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)

    class Gloo:
        def broadcast(self, tensor, src):
            dist.broadcast(tensor, src=src)

    torch.manual_seed(0)
    tensors = [torch.randn(16, 8).bfloat16(), torch.randn(8, 16).bfloat16(), torch.randn(3, 8).bfloat16()]
    buckets, views = w.bucket_buffers([list(t.shape) for t in tensors], torch.bfloat16, "cpu", 200)
    same = []
    for step in range(2):
        expected = [t + step for t in tensors]
        if rank == 0:
            torch._foreach_copy_(views, expected)
        w.broadcast_buckets(buckets, Gloo())
        same.append(all(torch.equal(a, b) for a, b in zip(expected, views)))
    if rank:
        queue.put(all(same) and len(buckets) == 2)
    dist.destroy_process_group()


def test_buckets_cross_a_real_process_group():
    assert run_ranks(_gloo_rank) == [True]


def test_one_broadcast_reaches_every_engine():  # cluster.rollout_engines=2: ranks 1 and 2 receive
    assert run_ranks(functools.partial(_gloo_rank, world_size=3), world_size=3) == [True, True]


# --- the learner's model on the engine's weights -------------------------------------------------


def fake_engine_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state of `model` as a vLLM engine with LoRA holds it: q|k|v and gate|up fused into
    one tensor each, linears under `.base_layer`, vocabulary rows padded to a multiple of 64,
    the tied lm_head not listed."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}
    for name, t in sd.items():
        module, _, kind = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf in ("q_proj", "gate_proj"):
            parts = ["q_proj", "k_proj", "v_proj"] if leaf == "q_proj" else ["gate_proj", "up_proj"]
            fused = "qkv_proj" if leaf == "q_proj" else "gate_up_proj"
            out[f"{parent}.{fused}.base_layer.{kind}"] = torch.cat([sd[f"{parent}.{p}.{kind}"] for p in parts])
        elif leaf in ("k_proj", "v_proj", "up_proj") or name == "lm_head.weight":
            continue
        elif leaf in ("o_proj", "down_proj"):
            out[f"{parent}.{leaf}.base_layer.{kind}"] = t
        elif leaf == "embed_tokens":
            padded = torch.zeros(-(-t.shape[0] // 64) * 64, t.shape[1], dtype=t.dtype)
            padded[: t.shape[0]] = t
            out[name] = padded
        else:
            out[name] = t
    return out


@pytest.fixture()
def original(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_model_on_engine_weights_gives_the_original_logits_without_a_copy(original):
    engine = fake_engine_weights(original)
    model = w.build_on_engine_weights(original.config, engine, {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                                                "gate_up_proj": ["gate_proj", "up_proj"]})  # fmt: skip
    ids = torch.randint(3, original.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-6)
    storages = {t.untyped_storage().data_ptr() for t in engine.values()}
    params = dict(model.named_parameters())
    assert all(p.untyped_storage().data_ptr() in storages for p in params.values())  # every parameter a view
    assert not any(p.requires_grad for p in params.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one view
    # k_proj is rows [q, q + kv) of the fused tensor: a write through the learner's view is the engine's
    k = model.model.layers[0].self_attn.k_proj.weight
    with torch.no_grad():
        k.fill_(0.5)
    fused = engine["model.layers.0.self_attn.qkv_proj.base_layer.weight"]
    q_rows = original.config.num_attention_heads * original.config.head_dim
    assert torch.all(fused[q_rows : q_rows + k.shape[0]] == 0.5) and not torch.any(fused[:q_rows] == 0.5)


def test_model_on_engine_weights_names_a_parameter_the_engine_lacks(original):
    engine = fake_engine_weights(original)
    engine.pop("model.norm.weight")
    with pytest.raises(ValueError, match="no tensor for the learner's parameter model.norm.weight.*weight_sync=object_store"):
        w.build_on_engine_weights(original.config, engine, {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                                            "gate_up_proj": ["gate_proj", "up_proj"]})  # fmt: skip


def test_model_on_engine_weights_refuses_tensors_of_another_config(original):
    engine = fake_engine_weights(original)
    engine["model.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match="model.norm.weight has shape \\(7,\\)"):
        w.build_on_engine_weights(original.config, engine, {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                                            "gate_up_proj": ["gate_proj", "up_proj"]})  # fmt: skip


def _4bit_param(nested: bool = False) -> torch.nn.Parameter:
    """An engine parameter as vLLM's bitsandbytes loading leaves a fused q|k linear: packed bytes, shard
    offsets, one QuantState per shard (stand-ins with QuantState's fields)."""
    param = torch.nn.Parameter(torch.zeros(12, 1, dtype=torch.uint8), requires_grad=False)
    state = lambda rows: SimpleNamespace(absmax=torch.rand(rows), code=torch.linspace(-1, 1, 16), nested=nested,  # noqa: E731
                                         shape=torch.Size([rows, 2]), dtype=torch.bfloat16, blocksize=64, quant_type="nf4")
    param.bnb_quant_state = {0: state(8), 1: state(4)}
    param.bnb_shard_offsets = torch.tensor([0, 8, 12])
    return param


def test_a_4bit_engine_weight_is_shared_with_what_rebuilds_its_shards():
    param, tensors = _4bit_param(), {}
    spec = w.quantized_spec("layers.0.qk_proj.weight", param, tensors)
    assert spec == {"offsets": [0, 8, 12], "shards": [
        {"shape": [8, 2], "dtype": "bfloat16", "blocksize": 64, "quant_type": "nf4"},
        {"shape": [4, 2], "dtype": "bfloat16", "blocksize": 64, "quant_type": "nf4"}]}  # fmt: skip
    states = param.bnb_quant_state
    assert tensors["layers.0.qk_proj.weight#absmax1"] is states[1].absmax  # shared as is, through CUDA IPC
    assert tensors["layers.0.qk_proj.weight#code0"] is states[0].code and len(tensors) == 4
    assert w.quantized_spec("layers.0.norm.weight", torch.nn.Parameter(torch.ones(2)), tensors) is None
    with pytest.raises(ValueError, match="nested"):
        w.quantized_spec("x", _4bit_param(nested=True), {})


def test_expandable_segments_are_refused_for_ipc(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64,expandable_segments:True")
    with pytest.raises(RuntimeError, match="remove expandable_segments:True"):
        w.check_ipc_allocator()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    w.check_ipc_allocator()


# --- the engine's side of the IPC and NCCL paths (FakeEngine: vLLM's LoRA buffers on CPU) --------


def plan_args(tensors):
    plan = vb.write_plan(tensors, LAYOUT, PACKED)
    return (*vb.plan_targets(plan), vb.plan_names(plan))


def test_ipc_path_pulls_the_learners_current_tensors_each_time(monkeypatch):
    engine, learner = FakeEngine(), peft_tensors(r=4)
    monkeypatch.setattr(vb, "open_shared_tensors", lambda payload: payload)  # no CUDA: the "mapped" tensors are these
    modules, slices, names = plan_args(learner)
    assert engine.collective_rpc("grpo_map_adapter", (vb.LORA_ID, modules, slices, names, learner, 4.0))[0] == 14
    qkv = engine.manager.modules["model.layers.0.self_attn.qkv_proj"]
    b_v = learner["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    for step in range(2):  # the optimizer updates the learner's tensors in place; each pull copies the current values
        engine.collective_rpc("grpo_pull_adapter")
        assert torch.equal(qkv.lora_b_stacked[2][1, 0, :, :4], (b_v * 4).bfloat16())
        b_v.add_(1.0)
    assert qkv.lora_a_stacked[0][0].count_nonzero() == 0  # the other slot untouched


def test_each_pull_reports_its_parts_for_the_next_rollouts_metrics(monkeypatch):
    engine, learner = FakeEngine(), peft_tensors(r=4)
    monkeypatch.setattr(vb, "open_shared_tensors", lambda payload: payload)
    monkeypatch.setattr(vb.VLLMBackend, "_serve_version", lambda self, version: setattr(self, "served", version))
    backend = object.__new__(vb.VLLMBackend)  # no engine start: only the pull
    backend.llm, backend.timings = engine, {}
    modules, slices, names = plan_args(learner)
    engine.collective_rpc("grpo_map_adapter", (vb.LORA_ID, modules, slices, names, learner, 4.0))
    backend.pull_adapter(5)
    parts = backend.timings
    assert backend.served == 5 and set(parts) == {"time/sync_engine", "time/sync_copy"}
    assert 0.0 < parts["time/sync_copy"] <= parts["time/sync_engine"]  # the copy is part of the engine call


def test_nccl_path_receives_buckets_into_the_slot():
    engine, learner = FakeEngine(), peft_tensors(r=4)
    modules, slices, _ = plan_args(learner)
    values = w.engine_values(learner, 4.0, torch.bfloat16)  # what the learner's buckets hold
    shapes = [list(v.shape) for v in values]
    wire = Wire()
    engine.worker._grpo_join(wire, vb.LORA_ID, modules, slices, shapes, "bfloat16", 100)
    down = engine.manager.modules["model.layers.0.mlp.down_proj"]
    a_down = learner["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    b_down = learner["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    for sign in (1, -1):  # two steps through the same buckets and captured copy
        sent, sent_views = w.bucket_buffers(shapes, torch.bfloat16, "cpu", 100)
        torch._foreach_copy_(sent_views, [sign * v for v in values])
        w.broadcast_buckets(sent, wire)
        wire.receiving = True
        assert engine.collective_rpc("grpo_receive_adapter")[0] == 14
        assert torch.equal(down.lora_a_stacked[0][1, 0, :4], (sign * a_down).bfloat16()) and not wire.sent
        assert torch.equal(down.lora_b_stacked[0][1, 0, :, :4], (sign * b_down * 4).bfloat16())  # scaled once
        del wire.receiving


# --- which path a config picks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, path",
    [([], "object_store"), (["rollout=vllm", "cluster=single_gpu"], "cuda_ipc"), (["rollout=vllm", "cluster=split"], "nccl"),
     (["cluster=single_gpu"], "object_store"),
     (["rollout=vllm", "cluster=single_gpu", "cluster.weight_sync=object_store"], "object_store")],
)  # fmt: skip
def test_auto_picks_ipc_when_colocated_and_nccl_when_split(overrides, path):
    cfg = load_config(overrides)
    sync = w.make_weight_sync(cfg)
    assert type(sync) is w.SYNC_PATHS[path]
    if path == "object_store":  # vllm engines take the adapter in their own layout, the hf model as tensors
        assert sync.engine_layout == (cfg.rollout.backend == "vllm")
    assert sync.shares_base == (path == "cuda_ipc") and sync.restartable == (path == "object_store")


@pytest.mark.parametrize(
    "overrides, message",
    [(["cluster.weight_sync=cuda_ipc"], "needs rollout=vllm and cluster=single_gpu"),
     (["rollout=vllm", "cluster=single_gpu", "cluster.weight_sync=nccl"], "needs rollout=vllm and cluster=split"),
     (["rollout=vllm", "cluster=single_gpu", "trainer.async_steps=1"], "rollout.release_memory=false"),
     (["trainer.sync_check_interval=-1"], "sync_check_interval must be >= 0"),
     (["trainer.sequence_chunk_tokens=-8"], "sequence_chunk_tokens must be >= 0"),
     (["rollout=vllm", "cluster=single_gpu", "cluster.learner_workers=2"], "and 1 with cluster=single_gpu"),
     (["cluster.learner_workers=9"], "at most the prompts of a step \\(8: "),
     (["cluster.learner_workers=0"], "needs at least 1"),
     (["rollout=vllm", "cluster=single_gpu", "cluster.rollout_engines=2"], "rollout_engines=2: .*and 1 with cluster=single_gpu"),
     (["cluster.rollout_engines=9"], "rollout_engines=9: .*at most the prompts of a step \\(8\\)"),
     (["cluster.rollout_engines=0"], "rollout_engines=0: needs at least 1"),
     (["cluster=single_gpu", "cluster.learner_gpus=0.75"], "rollout_gpus \\+ cluster.learner_gpus must be at most 1"),
     (["cluster=split", "cluster.rollout_gpus=2"], "rollout_gpus=2: each rollout actor runs on one GPU.*raise cluster.rollout_engines"),
     (["cluster=split", "cluster.learner_gpus=4"], "learner_gpus=4: each learner actor .*raise cluster.learner_workers"),
     (["rollout=vllm", "cluster=split", "cluster.rollout_engines=2", "cluster.rollout_gpus=0.5"],
      "rollout_gpus=0.5 and cluster.learner_gpus=1 must be more than 0.5.*set cluster.weight_sync=object_store"),
     (["rollout=vllm", "cluster=split", "cluster.weight_sync=object_store", "cluster.learner_workers=2",
       "cluster.learner_gpus=0.5"], "learner_workers=2 .*learner_gpus=0.5 must be more than 0.5"),
     (["cluster.learner_memory_gib=8"], "learner_memory_gib=8 caps the learner's GPU memory.*0 with cluster.placement=cpu"),
     (["rollout=vllm", "cluster=single_gpu", "cluster.learner_memory_gib=-1"], "must be >= 0"),
     (["rollout.kv_cache_gib=4"], "kv_cache_gib=4 sets the vLLM engine's KV cache.*needs rollout=vllm"),
     (["rollout=vllm", "rollout.kv_cache_gib=0"], "must be > 0"),
     (["rollout.max_num_seqs=8"], "max_num_seqs=8 sizes the vLLM engine.*needs rollout=vllm"),
     (["rollout.kv_cache_dtype=fp8"], "kv_cache_dtype=fp8 sets the vLLM engine's KV cache: it needs rollout=vllm"),
     (["rollout=vllm", "rollout.kv_cache_dtype=int4"], "rollout.kv_cache_dtype='int4' is not valid; choose one of auto, fp8"),
     (["rollout=vllm", "rollout.max_num_batched_tokens=0"], "max_num_batched_tokens=0 sizes the vLLM engine: it must be >= 1")],
)  # fmt: skip
def test_config_rules_name_the_setting_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_a_4bit_base_is_shared_colocated():  # the learner maps the engine's 4-bit linears (weights.QuantizedWeight)
    cfg = load_config(["rollout=vllm", "cluster=single_gpu", "model.quantization=nf4"])
    assert weight_sync_path(cfg) == "cuda_ipc" and w.make_weight_sync(cfg).shares_base


def test_engines_may_share_a_gpu_when_the_adapter_goes_through_the_object_store():
    cfg = load_config(["rollout=vllm", "cluster=split", "cluster.rollout_engines=2", "cluster.rollout_gpus=0.5",
                       "cluster.weight_sync=object_store"])  # fmt: skip
    assert cfg.cluster.rollout_gpus == 0.5 and weight_sync_path(cfg) == "object_store"


def test_async_colocated_is_allowed_when_the_engine_keeps_its_memory():
    cfg = load_config(["rollout=vllm", "cluster=single_gpu", "trainer.async_steps=1", "rollout.release_memory=false"])
    assert cfg.trainer.async_steps == 1


def test_a_learner_and_an_engine_on_every_gpu_is_a_valid_data_parallel_layout():
    # learners above half a GPU cannot share one (NCCL ranks), engines of 0.4 fill the rest of each GPU
    cfg = load_config(["rollout=vllm", "cluster=split", "cluster.learner_workers=2", "cluster.learner_gpus=0.6",
                       "cluster.rollout_engines=2", "cluster.rollout_gpus=0.4", "cluster.weight_sync=object_store"])  # fmt: skip
    assert (cfg.cluster.learner_workers, cfg.cluster.learner_gpus, cfg.cluster.rollout_gpus) == (2, 0.6, 0.4)
