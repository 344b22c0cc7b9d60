"""Context parallelism on 2 gloo ranks: each rank's attention over its two pieces of the rows,
with the K/V it receives, equals one process's attention over whole rows (outputs and the
gradients of q, k and v), for chunked and global layers, packed documents straddling the
pieces, halos longer than a piece, and both ways of aligning the causal runs; and the whole
tiny model trained with parallel.cp=2 follows the single-process losses step by step."""

import pytest
import torch

from tests.helpers import compose, run_ranks

pytestmark = pytest.mark.xdist_group("parallel_test_context")  # its module fixtures: built once


def _rows(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0: documents of 40, 100 and T - 140 tokens (edges inside pieces, one across the middle);
    row 1: the tail of a long document (positions from 500) then one of 30 tokens."""
    pos0 = torch.cat([torch.arange(n) for n in (40, 100, T - 140)])
    doc0 = torch.cat([torch.full((n,), i) for i, n in enumerate((40, 100, T - 140))])
    pos1 = torch.cat((torch.arange(500, 500 + T - 30), torch.arange(30)))
    doc1 = torch.cat((torch.zeros(T - 30, dtype=torch.long), torch.ones(30, dtype=torch.long)))
    return torch.stack((pos0, pos1)), torch.stack((doc0, doc1))


def _attention_on_ranks(T: int, chunk: int, lower_right: bool, with_docs: bool):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from model.attention import AttentionLayout
    from parallel.context import ContextParallel, ContextParallelLayout, head_tail_order

    dist.init_process_group("gloo")
    cp = ContextParallel.from_mesh(init_device_mesh("cpu", (2,), mesh_dim_names=("cp",)))
    B, H, Hkv, D = 2, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, Hkv, Hkv))
    weight = torch.randn(B, T, H, D, generator=g)
    positions, doc_ids = _rows(T)
    if not with_docs:
        doc_ids = None
    mine = head_tail_order(T, 2)[cp.rank]
    result = {}
    for chunked in (True, False):
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = AttentionLayout(B, T, chunk, positions, doc_ids, torch.device("cpu")).attend(*full, chunked=chunked)
        (ref * weight).sum().backward()
        local = [t[:, mine].clone().requires_grad_() for t in (q, k, v)]
        layout = ContextParallelLayout(positions, doc_ids, chunk, head_tail_order(T, 2), cp.rank, cp.group,
                                       torch.device("cpu"), lower_right)
        out = layout.attend(*local, chunked=chunked)
        (out * weight[:, mine]).sum().backward()
        plan = layout.chunked_plan if chunked else layout.global_plan
        result[chunked] = {
            "out": (out - ref[:, mine]).abs().max().item() / ref.abs().max().item(),
            "grads": [((a.grad - b.grad[:, mine]).abs().max() / b.grad.abs().max()).item()
                      for a, b in zip(local, full)],
            "received": sum(plan.recv_splits),
        }
    return result


@pytest.mark.parametrize("chunk,lower_right,with_docs", [(32, False, True), (32, True, True), (96, False, True),
                                                         (32, False, False)])
def test_attention_matches_one_process(chunk, lower_right, with_docs):
    T = 256  # pieces of 64 tokens: chunk 32 needs halos inside a piece, 96 across a whole piece
    for rank, result in enumerate(run_ranks(_attention_on_ranks, 2, T, chunk, lower_right, with_docs)):
        for chunked, r in result.items():
            assert r["out"] < 1e-5 and max(r["grads"]) < 1e-5, (rank, chunked, r)
        # Chunked layers receive at most a halo (< chunk) before each of the rank's two pieces
        # per row; global layers receive whole earlier documents.
        assert 0 < result[True]["received"] <= 2 * 2 * (chunk - 1), (rank, result[True]["received"])
        assert result[False]["received"] >= result[True]["received"]


def test_shard_batch_fills_the_patch_slots_with_their_own_features():
    from model import ModelArgs
    from parallel.context import ContextParallel, head_tail_order, shard_batch

    args = ModelArgs(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, ffn_hidden=32,
                     expert_hidden=16, n_experts=2, attention_chunk_size=8, max_seq_len=64, patch_token_id=5)
    args.vision.enabled = True
    tokens = torch.randint(6, 64, (2, 32))
    tokens[0, 10:13] = 5
    tokens[1, 0:2] = 5
    tokens[1, 20:30] = 5
    features = torch.arange(15.0)[:, None]  # one row per slot, in row-major order of the slots
    expected = torch.zeros(2, 32)
    expected[tokens == 5] = features.flatten()
    for rank in range(2):
        part = shard_batch({"tokens": tokens, "labels": tokens}, ContextParallel(2, rank, "unused"), args,
                           torch.device("cpu"))
        mine = head_tail_order(32, 2)[rank]
        got = torch.zeros(2, 16)
        got[part["tokens"] == 5] = features[part["image_rows"]].flatten()
        assert torch.equal(got, expected[:, mine])
        assert torch.equal(part["positions"], torch.arange(32)[mine].expand(2, 16))


def test_head_tail_order_balances_and_refuses_uneven_lengths():
    from parallel.context import head_tail_order

    order = head_tail_order(16, 2)
    assert order.tolist() == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    # Causal work per rank (sum of positions + 1) is equal under head-tail order.
    assert (order + 1).sum(1).tolist() == [68, 68]
    with pytest.raises(ValueError, match="multiple of 2 x parallel.cp"):
        head_tail_order(18, 2)


# ---------------------------------------------------------------- the whole training step

STEPS = 5
# Packed multimodal sample documents in rows of 512 tokens: 8 chunks of 64, pieces of 128 on
# cp=2, so documents straddle the pieces. Router aux loss off: it is a mean over each rank's
# tokens (as with data parallelism), so it differs from one process by design.
TRAIN = ["+model=tiny", "train.seq_len=512", "train.batch_size=2", f"train.steps={STEPS}", "optim.lr=2e-3",
         "optim.warmup_steps=1", "model.router_aux_loss_coef=0", "data.num_workers=0", "logging.interval=1",
         "logging.wandb.mode=disabled", "checkpoint.interval=0"]


def _train(run_dir: str, extra: list[str]):
    from train.loop import train

    return [row["loss"] for row in train(compose(TRAIN + [f"run.dir={run_dir}", *extra]))]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _train(str(tmp_path_factory.mktemp("one")), [])


@pytest.mark.parametrize("extra", [[], ["parallel.ep=2"]], ids=["cp2", "cp2-ep2"])
def test_cp2_trains_like_one_process(tmp_path, one_process, extra):
    two = run_ranks(_train, 2, str(tmp_path / "cp"), ["parallel.cp=2", *extra])
    assert two[0] == two[1]
    assert len(one_process) == STEPS == len(two[0])
    # fp32 sums in another order (per-rank CE, FSDP's reduce-scatter): ~1e-7 relative after 5 steps.
    for step, (a, b) in enumerate(zip(one_process, two[0])):
        assert abs(a - b) <= 1e-5 * abs(a), (step, one_process, two[0])
    with open(tmp_path / "cp" / "config.yaml") as f:
        assert "cp: 2" in f.read()
