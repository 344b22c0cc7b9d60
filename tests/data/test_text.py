"""The text source: N ranks see exactly the rows one process sees, and its state resumes."""
import pytest
import torch

from data.text import TextBatches, special_token_id


def test_ranks_partition_the_global_batch():
    one = TextBatches(None, 64, 4, 4352, seed=3)
    ranks = [TextBatches(None, 64, 2, 4352, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(5):
        whole = next(one)
        parts = [next(r) for r in ranks]
        assert torch.equal(whole["tokens"], torch.cat([p["tokens"] for p in parts]))
        assert torch.equal(whole["tokens"][:, 1:], whole["labels"][:, :-1])


def test_state_resumes_across_epochs():
    a = TextBatches(None, 256, 8, 4352, seed=1)
    for _ in range(a.batches_per_epoch + 3):
        next(a)
    b = TextBatches(None, 256, 8, 4352, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert torch.equal(next(a)["tokens"], next(b)["tokens"])


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        TextBatches(str(tmp_path / "missing.txt"), 64, 2, 4352)
    (tmp_path / "small.txt").write_text("hello")
    with pytest.raises(ValueError, match="too few"):
        TextBatches(str(tmp_path / "small.txt"), 64, 2, 4352)
    assert special_token_id("begin_of_text", 202048) == 200000
    assert special_token_id("end_of_text", 4352) == 4097
