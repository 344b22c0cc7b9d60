import json

import pytest
import torch

from data.args import DataArgs, Source
from data.loader import MultimodalLoader
from data.tokenizer import Tokenizer

from datakit import check_batch, key_dataset, same_batch

pytestmark = pytest.mark.xdist_group("data_test_loader")  # its module fixtures: built once

TOK = Tokenizer.tiny()


def batches(loader, n=None):
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def key_counts(all_batches, keys):
    counts = {k: 0 for k in keys}
    for b in all_batches:
        for tid in b["tokens"][b["doc_ids"] >= 0].tolist():
            if tid in counts:
                counts[tid] += 1
    return counts


@pytest.fixture(scope="module")
def keyset(tmp_path_factory):
    return key_dataset(tmp_path_factory.mktemp("keys"), TOK, shards=8, per_shard=6, image_every=7)


def test_one_pass_sees_every_sample_once_across_ranks_and_workers(keyset):
    root, ids = keyset
    args = DataArgs(urls=str(root), epochs=1, shuffle_buffer=4)
    seen = []
    for rank in range(2):
        loader = MultimodalLoader(
            args, rank=rank, world_size=2, batch_size=2, seq_len=256, seed=5, num_workers=2, in_process=True
        )
        got = batches(loader)
        for b in got:
            check_batch(b, TOK)
        seen += got
        assert got[-1]["documents"] == 24 and sum(got[-1]["skipped"].values()) == 0
    assert set(key_counts(seen, ids).values()) == {1}


def test_resume_is_exact_two_ranks_two_workers(keyset):
    root, _ = keyset
    args = DataArgs(urls=str(root), shuffle_buffer=4)  # endless epochs, reshuffled
    kw = dict(world_size=2, batch_size=2, seq_len=192, seed=11, num_workers=2, in_process=True)
    for rank in range(2):
        full = batches(MultimodalLoader(args, rank=rank, **kw), 14)
        first = MultimodalLoader(args, rank=rank, **kw)
        head = batches(first, 5)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
        resumed = MultimodalLoader(args, rank=rank, **kw)
        resumed.load_state_dict(state)
        tail = batches(resumed, 9)
        for x, y in zip(full, head + tail):
            same_batch(x, y)
        assert any(b["images"].shape[0] for b in full)


def test_worker_processes_match_in_process_and_resume(keyset):
    root, _ = keyset
    args = DataArgs(urls=str(root), shuffle_buffer=4)
    kw = dict(rank=1, world_size=2, batch_size=2, seq_len=192, seed=2, num_workers=2)
    ref = batches(MultimodalLoader(args, in_process=True, **kw), 7)
    procs = MultimodalLoader(args, **kw)
    head = batches(procs, 3)  # an odd count: the next batch comes from worker 1
    state = procs.state_dict()
    resumed = MultimodalLoader(args, **kw)
    resumed.load_state_dict(state)
    tail = batches(resumed, 4)
    for x, y in zip(ref, head + tail):
        same_batch(x, y)


def test_different_seeds_and_ranks_differ(keyset):
    root, _ = keyset
    args = DataArgs(urls=str(root))
    kw = dict(world_size=2, batch_size=2, seq_len=128, num_workers=1)
    a = batches(MultimodalLoader(args, rank=0, seed=0, **kw), 1)[0]["tokens"]
    b = batches(MultimodalLoader(args, rank=0, seed=1, **kw), 1)[0]["tokens"]
    c = batches(MultimodalLoader(args, rank=1, seed=0, **kw), 1)[0]["tokens"]
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_mixture_weights_and_resampling(tmp_path):
    root_a, ids_a = key_dataset(tmp_path / "a", TOK, shards=2, per_shard=10, seed=1)
    root_b, ids_b = key_dataset(tmp_path / "b", TOK, shards=2, per_shard=10, seed=2, first_key=20)
    assert not set(ids_a) & set(ids_b)
    args = DataArgs(sources=[Source(str(root_a), 3.0), Source(str(root_b), 1.0)], resample=True)
    got = batches(MultimodalLoader(args, batch_size=4, seq_len=256, seed=0), 40)
    n_a = sum(key_counts(got, ids_a).values())
    n_b = sum(key_counts(got, ids_b).values())
    assert n_a + n_b > 150
    assert 0.65 < n_a / (n_a + n_b) < 0.85


def test_state_from_other_settings_is_refused(keyset):
    root, _ = keyset
    loader = MultimodalLoader(DataArgs(urls=str(root)), batch_size=2, seq_len=128, num_workers=2, in_process=True)
    batches(loader, 1)
    other = MultimodalLoader(DataArgs(urls=str(root)), batch_size=2, seq_len=128, num_workers=3, in_process=True)
    with pytest.raises(ValueError, match="num_streams"):
        other.load_state_dict(loader.state_dict())


def test_bad_settings_name_the_field(keyset):
    root, _ = keyset
    with pytest.raises(ValueError, match="weight"):
        MultimodalLoader(DataArgs(sources=[Source(str(root), 0.0)]))
    with pytest.raises(ValueError, match="urls"):
        MultimodalLoader(DataArgs(urls=[]))


def test_a_stalled_source_is_reported_as_a_data_stall(tmp_path, keyset):
    """A shard that never delivers a byte (a FIFO with no writer: a hung filesystem or remote
    read) stops the rank with a DataStall naming it, not a silent hang."""
    import os
    import shutil

    from data.loader import DataStall

    root, _ = keyset
    shards = tmp_path / "shards"
    shutil.copytree(root, shards)
    for tar in sorted(shards.glob("*.tar"))[1:]:
        tar.unlink()
    os.mkfifo(shards / "part-9999.tar")  # the second stream's only shard: it blocks on open
    loader = MultimodalLoader(DataArgs(urls=str(shards)), batch_size=1, seq_len=128, num_workers=2, timeout_s=2)
    with pytest.raises(DataStall, match=r"rank 0: no batch from the data loader's workers in 2 s \(shards: 2 from"):
        for _ in loader:
            pass
