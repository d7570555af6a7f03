"""Automatic TP plans equal transformers' hand-written ones; TP logits and generate equal one process."""

import os

import pytest
import torch
import transformers
from torch.distributed.device_mesh import init_device_mesh

import hf_plugins
from hf_plugins.parallel import auto_tp_plan, tensor_parallel
from tests.parallel.ranks import run_ranks
from tests.quantizers.tiny_models import HIDDEN_SIZE, TINY_ARCHS, VOCAB_SIZE, tiny_model
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error

_SMALL = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128)
# Architectures beyond the tiny-model table: three with a hand-written plan to match, three with none (their
# attention reshapes with stored head counts, which sharding must make local).
_MORE_CONFIGS = {
    "qwen3": lambda: transformers.Qwen3Config(**_SMALL, num_key_value_heads=2, head_dim=16),
    "olmo2": lambda: transformers.Olmo2Config(**_SMALL, num_key_value_heads=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=4),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB_SIZE, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                          num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128),
    "stablelm-per-head-norms": lambda: transformers.StableLmConfig(**_SMALL, num_key_value_heads=2, qk_layernorm=True),
    "falcon": lambda: transformers.FalconConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2),
}
_WITHOUT_HAND_PLAN = ("opt", "stablelm-per-head-norms", "falcon")
_SIX_HEADS = {**_SMALL, "hidden_size": 96, "num_attention_heads": 6}
# 6 query heads in 3 key/value groups (SmolLM2-135M has 9 in 3): 2 ranks hold 2 and 1 groups.
_UNEVEN_CONFIGS = {
    "llama-3-groups": lambda: transformers.LlamaConfig(**_SIX_HEADS, num_key_value_heads=3, head_dim=16,
                                                       tie_word_embeddings=True),
    "stablelm-3-groups": lambda: transformers.StableLmConfig(**_SIX_HEADS, num_key_value_heads=3),
}
_MORE_CONFIGS.update(_UNEVEN_CONFIGS)


def _model(arch: str):
    if arch in TINY_ARCHS:
        return tiny_model(arch)[0].eval()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_MORE_CONFIGS[arch]()).eval()
    with torch.no_grad():  # norm gains and biases away from their init, so a wrong shard shows in the logits
        for param in model.parameters():
            if param.ndim == 1:
                param.normal_(1.0, 0.2)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (2, 11), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("arch", [*TINY_ARCHS, "qwen3", "olmo2", "gpt_neox"])
def test_auto_plan_equals_the_hand_written_plan(arch):
    model = _model(arch)
    assert model.tp_plan, "transformers ships a plan for this architecture"
    assert auto_tp_plan(model) == dict(model.tp_plan)


def test_auto_plan_covers_fused_projections_norms_and_models_without_a_plan():
    olmo2 = auto_tp_plan(_model("olmo2"))  # q/k norms span the whole projection: gather q, k and v
    assert olmo2["model.layers.*.self_attn.v_proj"] == "colwise_gather_output"
    assert olmo2["model.layers.*.self_attn.o_proj"] == "rowwise_split_input"
    qwen3 = auto_tp_plan(_model("qwen3"))  # per-head norms: sharded heads, gradients summed
    assert qwen3["model.layers.*.self_attn.q_norm"] == "replicated_with_grad_allreduce"
    opt = auto_tp_plan(_model("opt"))
    assert not _model("opt").tp_plan
    assert opt["model.decoder.layers.*.fc1"] == "colwise" and opt["model.decoder.layers.*.fc2"] == "rowwise"
    assert opt["model.decoder.layers.*.self_attn.out_proj"] == "rowwise"
    assert opt["lm_head"] == "colwise_gather_output" and opt["model.decoder.embed_tokens"] == "embedding_rowwise"


def test_indivisible_heads_raise_with_the_sizes_that_work():
    gemma = _model("gemma")  # multi-query attention: one key/value head
    with pytest.raises(ValueError, match=r"[kv]_proj has 1 heads in 1 group.* world size is 2\. .* at most 1\."):
        auto_tp_plan(gemma, world_size=2)
    with pytest.raises(ValueError, match=r"k_proj has 2 heads in 2 group.* world size is 4\. .* at most 2\."):
        auto_tp_plan(_model("llama"), world_size=4)


def test_uneven_head_groups_need_our_tensor_parallel():
    # transformers' DTensor shards are even: 3 key/value heads on 2 ranks need tensor_parallel's uneven groups.
    with pytest.raises(ValueError, match=r"k_proj has 3 heads .* do not split evenly over 2 ranks .* "
                                         r"Use hf_plugins.parallel.tensor_parallel\(model\)"):
        auto_tp_plan(_model("llama-3-groups"), world_size=2)
    with pytest.raises(ValueError, match=r"q_proj has 6 heads in 3 group.* world size is 4\. .* at most 3\."):
        auto_tp_plan(_model("llama-3-groups"), world_size=4)


def _uneven_shapes(rank, world_size):
    model = _model("llama-3-groups")
    tensor_parallel(model, init_device_mesh("cpu", (world_size,)))
    attention = model.model.layers[0].self_attn
    return attention.q_proj.weight.shape[0], attention.k_proj.weight.shape[0], attention.o_proj.weight.shape[1]


def test_ranks_hold_whole_key_value_groups_unevenly():
    assert run_ranks(_uneven_shapes) == [(4 * 16, 2 * 16, 4 * 16), (2 * 16, 1 * 16, 2 * 16)]


def test_tensor_parallel_without_a_process_group_says_how_to_launch():
    with pytest.raises(ValueError, match="needs torch.distributed: launch with `accelerate launch`"):
        tensor_parallel(_model("llama"))


def _shard_and_compare(model, world_size) -> tuple[float, bool]:
    """Shard ``model`` over the world; ``(max relative logit error, greedy tokens identical)`` against before."""
    ids = _ids()
    with torch.no_grad():
        expected_logits = model(ids).logits
    expected_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    tensor_parallel(model, init_device_mesh("cpu", (world_size,)))
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    return max_rel_error(logits, expected_logits), torch.equal(tokens, expected_tokens)


def _tp_logits_and_generate(rank, world_size, arch):
    model = _model(arch)
    error, same_tokens = _shard_and_compare(model, world_size)
    embeddings = model.get_input_embeddings()
    return (error, same_tokens, tuple(embeddings.weight.to_local().shape),
            model.get_output_embeddings().weight is embeddings.weight)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gemma2", "qwen3", "olmo2",
                                  *_WITHOUT_HAND_PLAN, *_UNEVEN_CONFIGS])
def test_tp_logits_and_greedy_generate_equal_one_process(arch):
    config = _model(arch).config
    for error, same_tokens, local_embeddings, tied in run_ranks(_tp_logits_and_generate, arch):
        assert error <= FLOAT_KERNEL_RTOL[torch.float32]
        assert same_tokens
        assert local_embeddings[0] == VOCAB_SIZE // 2  # vocabulary-parallel embeddings
        assert tied == config.tie_word_embeddings  # a tied head stays tied to the sharded embedding


def _tp_local_shapes(rank, world_size):
    model = _model("llama")
    tensor_parallel(model, init_device_mesh("cpu", (world_size,)))
    layer = model.model.layers[0]
    local = [module.weight.to_local().shape for module in (layer.self_attn.q_proj, layer.self_attn.o_proj,
                                                            layer.mlp.down_proj)]
    return tuple(tuple(shape) for shape in local)


def test_each_rank_holds_its_column_and_row_shards():
    for q_proj, o_proj, down_proj in run_ranks(_tp_local_shapes):
        assert q_proj == (HIDDEN_SIZE // 2, HIDDEN_SIZE)  # 2 of 4 heads
        assert o_proj == (HIDDEN_SIZE, HIDDEN_SIZE // 2)
        assert down_proj == (HIDDEN_SIZE, 128 // 2)


def _tp_awq(rank, world_size, backend):
    os.environ["HF_PLUGINS_BACKEND"] = backend
    model = hf_plugins.self_draft(tiny_model("llama")[0], bits=4, group_size=32).eval()
    error, same_tokens = _shard_and_compare(model, world_size)
    q_proj, down_proj = model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.down_proj
    return (error, same_tokens, (q_proj.out_features, tuple(q_proj.scales.shape)),
            (down_proj.in_features, tuple(down_proj.scales.shape)))


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("cpu", torch.bfloat16)])
def test_awq_model_shards_packed_weights_along_whole_groups(backend, dtype):
    # The reference kernel computes in fp32; the CPU int4 kernel rounds activations to bf16.
    for error, same_tokens, column, row in run_ranks(_tp_awq, backend):
        assert error <= FLOAT_KERNEL_RTOL[dtype]
        assert same_tokens
        assert column == (HIDDEN_SIZE // 2, (HIDDEN_SIZE // 32, HIDDEN_SIZE // 2))  # half the output channels
        assert row == (128 // 2, (128 // 2 // 32, HIDDEN_SIZE))  # two of four groups of 32 inputs


def test_awq_input_shards_must_hold_whole_groups():
    layer = hf_plugins.AwqLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"whole quantization groups: the shard \[0, 32\) of in_features=64 cuts"):
        layer.tp_shard("in", 0, 32)
    with pytest.raises(ValueError, match=r"8 output channels per int32: the shard \[0, 4\) of out_features=32"):
        layer.tp_shard("out", 0, 4)


def _wrong_plan(rank, world_size):
    model = _model("llama")
    plan = dict(model.tp_plan)
    plan["model.layers.*.mlp.down_proj"] = "colwise"  # a column after a column: the MLP output stays split
    try:
        tensor_parallel(model, init_device_mesh("cpu", (world_size,)), plan=plan)
    except ValueError as error:
        return str(error)
    return None


def test_a_plan_that_does_not_fit_the_model_is_caught_by_the_logit_check():
    for message in run_ranks(_wrong_plan):
        assert message is not None and "tensor-parallel LlamaForCausalLM" in message


def _load_distributed(rank, world_size, path, plan):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    config = transformers.DistributedConfig(tp_size=world_size, tp_plan=plan)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, distributed_config=config).eval()
    ids = _ids()
    with torch.no_grad():
        return max_rel_error(model(ids).logits, reference(ids).logits)


def test_auto_plan_loads_through_transformers_distributed_config(tmp_path):
    model = _model("qwen2")
    model.save_pretrained(tmp_path)
    for error in run_ranks(_load_distributed, str(tmp_path), auto_tp_plan(model)):
        assert error <= FLOAT_KERNEL_RTOL[torch.float32]


def _load_awq_distributed(rank, world_size, path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    config = transformers.DistributedConfig(tp_size=world_size, tp_plan="auto")
    try:
        transformers.AutoModelForCausalLM.from_pretrained(path, distributed_config=config)
    except ValueError as error:
        return str(error)
    return None


def test_awq_checkpoints_refuse_distributed_loading_and_point_to_tensor_parallel(tmp_path):
    model = tiny_model("llama")[0]
    hf_plugins.quantize(model, hf_plugins.AwqConfig(bits=4, group_size=32, scale_search=False, clip=False))
    model.save_pretrained(tmp_path)
    for message in run_ranks(_load_awq_distributed, str(tmp_path)):
        assert message is not None and "then call hf_plugins.parallel.tensor_parallel(model)" in message
