"""The vllm backend's pure parts, without vllm: peft names -> the engine's fused LoRA slices,
the zero adapter registered at start, sampling settings, seeds, and CompletionOutput conversion."""

from types import SimpleNamespace

import pytest
import torch

from grpo_ray.actors import vllm_backend as vb
from grpo_ray.config import load_config
from grpo_ray.types import AdapterWeights, EngineAdapter
from grpo_ray.weights import adapter_pairs, engine_values

# What a Llama/Qwen2 engine reports (hidden 8, q 8 rows, k/v 4 rows, intermediate 12, 1 layer, max rank 8).
LAYOUT = {
    "model.layers.0.self_attn.qkv_proj": [(8, 8, 8), (8, 4, 8), (8, 4, 8)],
    "model.layers.0.self_attn.o_proj": [(8, 8, 8)],
    "model.layers.0.mlp.gate_up_proj": [(8, 12, 8), (8, 12, 8)],
    "model.layers.0.mlp.down_proj": [(12, 8, 8)],
}
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def peft_tensors(r=4, modules=None):
    out = {}
    for path, (module, s) in vb.engine_targets(LAYOUT, PACKED).items():
        if modules and path.rpartition(".")[2] not in modules:
            continue
        in_f, out_f, _ = LAYOUT[module][s]
        out[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, in_f)
        out[f"base_model.model.{path}.lora_B.weight"] = torch.randn(out_f, r)
    return out


def test_engine_targets_unfuse_qkv_and_gate_up_in_row_order():
    targets = vb.engine_targets(LAYOUT, PACKED)
    assert targets["model.layers.0.self_attn.q_proj"] == ("model.layers.0.self_attn.qkv_proj", 0)
    assert targets["model.layers.0.self_attn.k_proj"] == ("model.layers.0.self_attn.qkv_proj", 1)
    assert targets["model.layers.0.self_attn.v_proj"] == ("model.layers.0.self_attn.qkv_proj", 2)
    assert targets["model.layers.0.mlp.gate_proj"] == ("model.layers.0.mlp.gate_up_proj", 0)
    assert targets["model.layers.0.mlp.up_proj"] == ("model.layers.0.mlp.gate_up_proj", 1)
    assert targets["model.layers.0.self_attn.o_proj"] == ("model.layers.0.self_attn.o_proj", 0)
    assert len(targets) == 7


def test_engine_targets_reject_a_slice_count_that_does_not_match_the_packing():
    with pytest.raises(ValueError, match="has 2 slices but packs"):
        vb.engine_targets({"model.layers.0.self_attn.qkv_proj": [(8, 8, 8)] * 2}, PACKED)


def test_zero_adapter_covers_every_engine_slice_in_peft_names():
    config, tensors = vb.zero_adapter(LAYOUT, PACKED, r=4, alpha=8)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(tensors) == 14
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (4, 8)
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (4, 4)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 12)
    assert all(t.count_nonzero() == 0 for t in tensors.values())


def test_write_plan_maps_every_pair_to_its_slice():
    tensors = peft_tensors()
    plan = vb.write_plan(tensors, LAYOUT, PACKED)
    assert len(plan) == 7
    by_a = {a: (module, s) for module, s, a, _ in plan}
    assert by_a["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"] == ("model.layers.0.self_attn.qkv_proj", 2)
    for module, s, a, b in plan:
        assert a.replace("lora_A", "lora_B") == b


def test_write_plan_of_a_partial_adapter_touches_only_its_modules():
    plan = vb.write_plan(peft_tensors(modules={"q_proj", "v_proj"}), LAYOUT, PACKED)
    assert [(m.rpartition(".")[2], s) for m, s, _, _ in plan] == [("qkv_proj", 0), ("qkv_proj", 2)]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.pop("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"), "lacks its lora_B"),
        (lambda t: t.update({"base_model.model.model.layers.0.mlp.foo.lora_A.weight": torch.zeros(4, 8),
                             "base_model.model.model.layers.0.mlp.foo.lora_B.weight": torch.zeros(8, 4)}), "no LoRA layer"),
        (lambda t: t.update({"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.zeros(4, 8)}), "do not fit"),
        (lambda t: t.update({"base_model.model.lm_head.lora_embedding_A": torch.zeros(4, 8)}), "not a peft LoRA A/B"),
    ],
    ids=["missing-B", "unknown-module", "wrong-shape", "not-lora-matrix"],
)  # fmt: skip
def test_write_plan_errors_name_the_module(mutate, message):
    tensors = peft_tensors()
    mutate(tensors)
    with pytest.raises(ValueError, match=message):
        vb.write_plan(tensors, LAYOUT, PACKED)


def test_write_plan_rejects_a_rank_above_the_engine_slot():
    with pytest.raises(ValueError, match="max rank=8"):
        vb.write_plan(peft_tensors(r=16), LAYOUT, PACKED)


class FakeEngine:
    """A worker with LoRA buffers shaped as vLLM's (2 slots, max rank 8), reached as collective_rpc does in-process."""

    def __init__(self):
        layers = {
            name: SimpleNamespace(
                lora_a_stacked=tuple(torch.zeros(2, 1, rank, i, dtype=torch.bfloat16) for i, _, rank in slices),
                lora_b_stacked=tuple(torch.zeros(2, 1, o, rank, dtype=torch.bfloat16) for _, o, rank in slices),
            )
            for name, slices in LAYOUT.items()
        }
        self.manager = SimpleNamespace(modules=layers, packed_modules_mapping=PACKED, lora_index_to_id=[None, vb.LORA_ID])
        self.worker = type("Worker", (vb.LoRAWriterExtension,), {})()
        self.worker.model_runner = SimpleNamespace(lora_manager=SimpleNamespace(_adapter_manager=self.manager))

    def collective_rpc(self, method, args=()):
        return [getattr(self.worker, method)(*args)]


def test_load_adapter_writes_a_and_scaled_b_into_the_adapter_slot():
    engine = FakeEngine()
    backend = object.__new__(vb.VLLMBackend)  # no engine start: only the write path
    layout = engine.collective_rpc("grpo_lora_layout")[0]
    backend.llm, backend.scale, backend.dtype, backend._plan, backend.timings = engine, 16 / 4, torch.bfloat16, None, {}
    backend.layout, backend.packed, backend.adapter_dir = layout["modules"], layout["packed"], "unused"
    backend._serve_version = lambda version: setattr(backend, "served", version)  # LoRARequest needs vllm
    tensors = peft_tensors(r=4)
    backend.load_adapter(AdapterWeights(version=1, tensors=tensors))
    layer = engine.manager.modules["model.layers.0.self_attn.qkv_proj"]
    a_k = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    b_k = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    assert torch.equal(layer.lora_a_stacked[1][1, 0, :4], a_k.bfloat16())  # slot 1 holds LORA_ID, slice 1 is k
    assert torch.equal(layer.lora_b_stacked[1][1, 0, :, :4], (b_k * 4).bfloat16())  # B scaled by alpha / r
    for a, b in zip(layer.lora_a_stacked, layer.lora_b_stacked):
        assert a[0].count_nonzero() == 0 and b[0].count_nonzero() == 0  # the other slot untouched
        assert a[1, 0, 4:].count_nonzero() == 0 and b[1, 0, :, 4:].count_nonzero() == 0  # ranks above r stay 0
    down = engine.manager.modules["model.layers.0.mlp.down_proj"]
    a_down = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    assert torch.equal(down.lora_a_stacked[0][1, 0, :4], a_down.bfloat16()) and backend.served == 1
    assert backend.timings["time/sync_engine"] > 0  # the next rollout's metric
    # a second update replaces the values (same plan, no reload), served under the new version's name
    backend.load_adapter(AdapterWeights(version=2, tensors={k: -v for k, v in tensors.items()}))
    assert torch.equal(layer.lora_a_stacked[1][1, 0, :4], (-a_k).bfloat16()) and backend.served == 2
    # the learner's export in the engine's layout (object store to vllm engines) writes the same values
    names = [n for _, a, b in adapter_pairs(tensors) for n in (a, b)]
    values = engine_values({k: 2 * v for k, v in tensors.items()}, 4.0, torch.bfloat16)
    payload = torch.cat([v.reshape(-1) for v in values]).view(torch.uint8).numpy().tobytes()
    backend.load_adapter(EngineAdapter(3, {n: list(tensors[n].shape) for n in names}, "bfloat16", payload))
    assert torch.equal(layer.lora_a_stacked[1][1, 0, :4], (2 * a_k).bfloat16()) and backend.served == 3
    assert torch.equal(layer.lora_b_stacked[1][1, 0, :, :4], (2 * b_k * 4).bfloat16())


def test_write_refuses_an_adapter_that_is_not_in_a_slot():
    engine = FakeEngine()
    engine.manager.lora_index_to_id = [None, None]
    with pytest.raises(RuntimeError, match="not in a GPU slot"):
        engine.collective_rpc("grpo_write_lora", (vb.LORA_ID, [], [], [], "bfloat16", b""))


def test_max_lora_rank_rounds_up_to_a_vllm_rank():
    assert [vb.max_lora_rank(r) for r in (1, 4, 8, 12, 16, 64, 300)] == [1, 8, 8, 16, 16, 64, 320]
    with pytest.raises(ValueError, match="largest LoRA rank"):
        vb.max_lora_rank(1024)


def test_sampling_settings_and_model_len_come_from_the_rollout_config():
    cfg = load_config(["rollout=vllm", "rollout.temperature=0.7", "rollout.top_k=20", "rollout.stop=[END]",
                       "rollout.max_prompt_length=100", "rollout.max_completion_length=28",
                       "+rollout.generation_kwargs.presence_penalty=0.5"])  # fmt: skip
    kwargs = vb.sampling_kwargs(cfg.rollout)
    assert kwargs["temperature"] == 0.7 and kwargs["top_k"] == 20 and kwargs["max_tokens"] == 28
    assert kwargs["stop"] == ["END"] and kwargs["logprobs"] == 0 and kwargs["presence_penalty"] == 0.5
    assert vb.max_model_len(cfg.rollout) == 128
    cfg.rollout.max_prompt_length = None
    assert vb.max_model_len(cfg.rollout) is None
    assert vb.sampling_kwargs(load_config(["rollout=vllm"]).rollout)["stop"] is None


def test_request_seeds_do_not_overlap_across_prompts_or_calls():
    n = 8
    seeds = [vb.request_seed(call, b, n) + i for call in range(50) for b in range(16) for i in range(n)]
    assert len(set(seeds)) == len(seeds)


def test_to_generation_reads_the_sampled_tokens_logprobs():
    lp = lambda x: SimpleNamespace(logprob=x)  # noqa: E731
    out = SimpleNamespace(token_ids=[5, 7, 2], finish_reason="stop",
                          logprobs=[{5: lp(-0.5), 9: lp(-0.1)}, {7: lp(-1.0)}, {2: lp(-2.0)}])  # fmt: skip
    gen = vb.to_generation(out)
    assert gen.token_ids == [5, 7, 2] and gen.logprobs == [-0.5, -1.0, -2.0] and gen.finish_reason == "stop"
    with pytest.raises(RuntimeError, match="reason 'abort'"):
        vb.to_generation(SimpleNamespace(token_ids=[5], finish_reason="abort", logprobs=[{5: lp(-1.0)}]))
    with pytest.raises(RuntimeError, match="no logprob"):
        vb.to_generation(SimpleNamespace(token_ids=[5], finish_reason="length", logprobs=None))


def test_rollout_actor_picks_the_vllm_backend(tiny_model_dir, monkeypatch):
    from grpo_ray.actors.rollout import RolloutActor

    made = []

    class FakeBackend:
        def __init__(self, cfg, model_path, tokenizer, release_memory):
            made.append((cfg.rollout.backend, model_path, tokenizer.eos_token, release_memory))

    monkeypatch.setattr(vb, "VLLMBackend", FakeBackend)
    cfg = load_config([f"model.name_or_path={tiny_model_dir}", "rollout=vllm"])
    actor = RolloutActor(cfg, str(tiny_model_dir))
    assert isinstance(actor.backend, FakeBackend) and made == [("vllm", str(tiny_model_dir), "<|im_end|>", False)]
    # colocated with the learner, the engine frees its KV cache between generations (unless told not to)
    RolloutActor(load_config([f"model.name_or_path={tiny_model_dir}", "rollout=vllm", "cluster=single_gpu"]), str(tiny_model_dir))
    RolloutActor(load_config([f"model.name_or_path={tiny_model_dir}", "rollout=vllm", "cluster=single_gpu",
                              "rollout.release_memory=false"]), str(tiny_model_dir))  # fmt: skip
    assert [m[3] for m in made[1:]] == [True, False]


def test_engine_args_follow_the_config_and_sleep_only_when_releasing_memory():
    cfg = load_config(["rollout=vllm", "model.dtype=auto", "model.lora.r=12", "rollout.gpu_memory_utilization=0.2",
                       "rollout.max_prompt_length=100", "rollout.max_completion_length=28", "trainer.seed=7"])  # fmt: skip
    args = vb.engine_args(cfg, "/m", "/m/tok")
    assert args["model"] == "/m" and args["tokenizer"] == "/m/tok" and args["dtype"] == "bfloat16"
    assert args["max_lora_rank"] == 16 and args["max_loras"] == 1 and args["enable_lora"]
    assert args["max_model_len"] == 128 and args["gpu_memory_utilization"] == 0.2 and args["seed"] == 7
    assert args["logprobs_mode"] == "processed_logprobs" and args["distributed_executor_backend"] == "uni"
    assert not args["enable_sleep_mode"] and vb.engine_args(cfg, "/m", "/m/tok", release_memory=True)["enable_sleep_mode"]
    assert args["kv_cache_memory_bytes"] is None  # sized by gpu_memory_utilization
    sized = vb.engine_args(load_config(["rollout=vllm", "rollout.kv_cache_gib=1.5"]), "/m", "/m/tok")
    assert sized["kv_cache_memory_bytes"] == 3 * 2**29
    assert args["max_num_seqs"] is None and args["max_num_batched_tokens"] is None  # vLLM's defaults
    sized = vb.engine_args(load_config(["rollout=vllm", "rollout.max_num_seqs=16", "rollout.max_num_batched_tokens=2048"]),
                           "/m", "/m/tok")  # fmt: skip
    assert sized["max_num_seqs"] == 16 and sized["max_num_batched_tokens"] == 2048
    assert args["kv_cache_dtype"] == "auto"
    assert vb.engine_args(load_config(["rollout=vllm", "rollout.kv_cache_dtype=fp8"]), "m", "t")["kv_cache_dtype"] == "fp8"


def test_each_write_is_served_under_a_new_name_even_for_a_version_seen_before(monkeypatch):
    """A retried step or a restored checkpoint writes a version number again with other values:
    its name must differ, or vLLM's prefix cache would serve KV blocks of the old values."""
    import sys

    request = SimpleNamespace(LoRARequest=lambda name, lora_id, path: SimpleNamespace(lora_name=name, lora_int_id=lora_id))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    engine = FakeEngine()
    backend = object.__new__(vb.VLLMBackend)
    layout = engine.collective_rpc("grpo_lora_layout")[0]
    backend.llm, backend.scale, backend.dtype, backend._plan, backend._writes, backend.timings = engine, 4.0, torch.bfloat16, None, 0, {}
    backend.layout, backend.packed, backend.adapter_dir = layout["modules"], layout["packed"], "unused"
    tensors = peft_tensors(r=4)
    names = []
    for values in (tensors, {k: -v for k, v in tensors.items()}, tensors):
        backend.load_adapter(AdapterWeights(version=3, tensors=values))
        names.append(backend.lora_request.lora_name)
        assert backend.lora_request.lora_int_id == vb.LORA_ID  # the same slot
    assert len(set(names)) == 3 and all("v3" in name for name in names)


def test_an_engine_that_does_not_start_names_our_memory_and_length_settings(monkeypatch):
    """With the EngineCore in its own process, vLLM raises a bare "initialization failed" (the cause,
    e.g. no room for the KV cache, is in its log); the error says which of our settings to change."""
    import sys

    from grpo_ray.errors import EngineStartError

    def failing_llm(**kwargs):
        assert kwargs["worker_cls"] == vb.WORKER_CLS
        raise RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")

    cfg = load_config(["rollout=vllm", "rollout.gpu_memory_utilization=0.2", "rollout.max_prompt_length=100",
                       "rollout.max_completion_length=28"])  # fmt: skip
    args = vb.engine_args(cfg, "/m", "/m/tok")
    sized = vb.engine_args(load_config(["rollout=vllm", "rollout.kv_cache_gib=2"]), "/m", "/m/tok")
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=failing_llm))
    with pytest.raises(EngineStartError) as caught:
        vb.start_engine(args)
    message = str(caught.value)
    assert message.startswith("the vLLM engine did not start: Engine core initialization failed.")
    assert "max_model_len = 128 tokens" in message and "rollout.gpu_memory_utilization (now 0.2)" in message
    assert "rollout.max_prompt_length + rollout.max_completion_length" in message
    with pytest.raises(EngineStartError, match="raise rollout.kv_cache_gib \\(now 2\\)"):
        vb.start_engine(sized)
