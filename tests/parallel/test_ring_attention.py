"""Ring attention over 2 ranks equals full causal attention, forward and backward, on odd sequence lengths."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hf_plugins.attention import ring as ring_attention_module
from hf_plugins.parallel.sequence import zigzag_shard
from tests.parallel.ranks import run_ranks
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error


def _full_attention(q, k, v, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _ring_vs_full(rank, world_size, length, heads, kv_heads, tile):
    ring_attention_module.TILE = tile  # small tiles exercise skipping and merging
    gen = torch.Generator().manual_seed(length)
    shape = (2, heads, length, 16)
    q = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn((2, kv_heads, length, 16), generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn((2, kv_heads, length, 16), generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    full = _full_attention(q, k, v, 0.25)
    full.backward(grad_out)

    shard = zigzag_shard(length, rank, world_size)

    def local(x):
        padded = F.pad(x.detach(), (0, 0, 0, int(shard.index.max()) + 1 - length))
        return padded[:, :, shard.index].clone().requires_grad_(True)
    lq, lk, lv = local(q), local(k), local(v)
    out = ring_attention_module.ring_attention(lq, lk, lv, shard.index, 0.25, dist.group.WORLD)
    valid = shard.valid
    out.backward(torch.where(valid[None, None, :, None], local(grad_out).detach(), 0.0))
    keep = shard.index[valid]
    errors = [max_rel_error(out[:, :, valid], full[:, :, keep])]
    pairs = ((lq, q), (lk, k), (lv, v))
    errors += [max_rel_error(mine.grad[:, :, valid], theirs.grad[:, :, keep]) for mine, theirs in pairs]
    return (*errors, int(valid.sum()))


@pytest.mark.parametrize("length, heads, kv_heads, tile", [(37, 4, 2, 4), (64, 2, 2, 512), (13, 6, 3, 3)])
def test_ring_attention_forward_and_gradients_equal_full_attention(length, heads, kv_heads, tile):
    results = run_ranks(_ring_vs_full, length, heads, kv_heads, tile)
    assert sum(r[-1] for r in results) == length  # every token on exactly one rank
    for out_error, q_error, k_error, v_error, _ in results:
        for error in (out_error, q_error, k_error, v_error):
            assert error <= FLOAT_KERNEL_RTOL[torch.float64] * 1e3  # float64, a different summation order


def _model_with_ring_attention(rank, world_size, length, data_parallel):
    import copy

    import hf_plugins  # noqa: F401 - registers ring_attention
    from torch.nn.parallel import DistributedDataParallel

    from hf_plugins.parallel.sequence import shard_for_group, sharded_next_token_loss
    from tests.quantizers.tiny_models import VOCAB_SIZE, tiny_model

    reference = tiny_model("llama")[0].double().train()
    model = copy.deepcopy(reference)
    model.set_attn_implementation("ring_attention")
    replicas = 2 if data_parallel else 1
    ids = torch.randint(3, VOCAB_SIZE, (2 * replicas, length + 1), generator=torch.Generator().manual_seed(2))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    expected = F.cross_entropy(reference(inputs).logits.flatten(0, 1), targets.flatten())
    expected.backward()

    # Ranks (0, 1) and (2, 3) each hold one data-parallel replica's rows, split along the sequence.
    sequence_ranks = [[0, 1], [2, 3]] if data_parallel else [[0, 1]]
    groups = [dist.new_group(r) for r in sequence_ranks]
    group = groups[rank // 2]
    rows = slice(2 * (rank // 2), 2 * (rank // 2) + 2)
    shard = shard_for_group(length, group)
    trained = DistributedDataParallel(model) if data_parallel else model
    logits = trained(shard.take(inputs[rows]), position_ids=shard.position_ids(2), sequence_group=group).logits
    loss = sharded_next_token_loss(logits, shard.take(targets[rows]), shard, group)
    loss.backward()
    if not data_parallel:  # DDP averages gradients over all ranks itself
        for param in model.parameters():
            dist.all_reduce(param.grad)
            param.grad /= world_size
    total = loss.detach().clone()
    dist.all_reduce(total)
    expected_grads = dict(reference.named_parameters())
    errors = [max_rel_error(p.grad, expected_grads[n].grad) for n, p in model.named_parameters()]
    return max_rel_error(total / world_size, expected.detach()), max(errors), shard.index.numel()


@pytest.mark.parametrize("data_parallel", [False, True], ids=["sequence-2", "data-2-x-sequence-2"])
def test_llama_with_ring_attention_trains_like_one_process(data_parallel):
    length = 29  # odd: padded to 32 across the zig-zag chunks
    world = 4 if data_parallel else 2
    for loss_error, grad_error, local_len in run_ranks(_model_with_ring_attention, length, data_parallel,
                                                        world_size=world):
        # float64 model, but Llama's RMSNorm computes in float32: float32-level agreement.
        assert loss_error <= FLOAT_KERNEL_RTOL[torch.float32] and grad_error <= FLOAT_KERNEL_RTOL[torch.float32]
        assert local_len == 16  # half the padded sequence: never gathered on one rank
