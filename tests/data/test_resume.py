"""Resume from every boundary: a stream rebuilt from any saved state yields exactly what the
uninterrupted one goes on to yield, at epoch ends, unit (shard) ends, shuffle-block ends and
the end of a finite run included."""

import json

import pytest

from data.args import DataArgs, Source
from data.loader import MultimodalLoader
from data.shards import expand_shards
from data.stream import SourceStream
from data.tokenizer import Tokenizer

from datakit import key_dataset, same_batch, write_tar

pytestmark = pytest.mark.xdist_group("data_test_resume")  # its module fixtures: built once

TOK = Tokenizer.tiny()
SHARDS, PER_SHARD = 8, 3  # 2 ranks x 2 workers: each stream reads 2 shards = 6 samples an epoch


def roundtrip(state):
    return json.loads(json.dumps(state))  # checkpoints store the state as JSON


# -- SourceStream: every item boundary ---------------------------------------------------------
def item_name(item):
    if item is None:
        return None
    if "__error__" in item:
        return ("error", item["__error__"], item["__url__"])
    return (item["__url__"], item["__key__"])


def read_items(stream, limit):
    """Up to `limit` item names, with the state saved before each; stops after a None."""
    names, states = [], []
    for _ in range(limit):
        states.append(roundtrip(stream.state_dict()))
        names.append(item_name(stream.next_item()))
        if names[-1] is None:
            break
    states.append(roundtrip(stream.state_dict()))
    return names, states


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Shards of 3, 1, 4 and 2 samples, a truncated one and one that is not a tar at all."""
    root = tmp_path_factory.mktemp("uneven")
    for s, n in enumerate([3, 1, 4, 2]):
        write_tar(root / f"good-{s}.tar", [{"__key__": f"g{s}-{j}", "txt": f"{s} {j}"} for j in range(n)])
    write_tar(root / "trunc.tar", [{"__key__": f"t-{j}", "txt": "z " * 3000} for j in range(3)])
    data = (root / "trunc.tar").read_bytes()
    (root / "trunc.tar").write_bytes(data[: len(data) - 5000])
    (root / "zz-garbage.tar").write_bytes(b"not a tar" * 50)
    return root


@pytest.mark.parametrize(
    "stream,num_streams,names",
    [
        (0, 1, None),
        (1, 2, None),
        # fewer shards than streams: stream 6 of 7 reads every 2nd sample of one of 4 shards
        (6, 7, ["good-0", "good-2", "good-3", "trunc"]),
    ],
)
@pytest.mark.parametrize(
    "shuffle,buffer,epochs,resample",
    [
        (False, 1, None, False),
        (True, 2, None, False),
        (True, 3, None, False),
        (True, 5, 2, False),
        (False, 1, 3, False),
        (True, 3, None, True),
    ],
)
def test_source_stream_resumes_from_every_item(
    uneven_shards, stream, num_streams, names, shuffle, buffer, epochs, resample
):
    urls = expand_shards(str(uneven_shards) if names is None else [str(uneven_shards / f"{n}.tar") for n in names])
    args = DataArgs(urls=urls, shuffle=shuffle, shuffle_buffer=buffer, epochs=epochs, resample=resample)

    def make():
        return SourceStream(urls, stream, num_streams, seed=7, source=0, args=args)

    full, states = read_items(make(), 30)
    assert sum(name is not None and name[0] != "error" for name in full) >= 2
    for i, state in enumerate(states):
        resumed = make()
        resumed.load_state_dict(state)
        tail, _ = read_items(resumed, len(full) - i)
        assert tail == full[i:], f"resumed from item {i}: {state}"


def test_resumed_stream_of_bad_data_still_raises(tmp_path):
    """The "no usable sample" check waits for one whole epoch after a resume; it still fires."""
    (tmp_path / "x.tar").write_bytes(b"garbage" * 100)
    urls = expand_shards(str(tmp_path))
    for resample, start in [(False, [0, 1, 0]), (False, [2, 0, 0]), (True, [0, 5, 3])]:
        stream = SourceStream(urls, 0, 1, seed=0, source=0, args=DataArgs(urls=urls, resample=resample))
        stream.load_state_dict({"block_start": start, "block_index": 3, "emitted": 0})
        with pytest.raises(RuntimeError, match="no usable sample"):
            for _ in range(200):
                stream.next_item()


# -- MultimodalLoader: every batch boundary ----------------------------------------------------
@pytest.fixture(autouse=True)
def one_tokenizer(monkeypatch):
    """Every loader and stream here shares one tokenizer: a resume at every boundary builds
    about a hundred loaders, and loading the tokenizer is most of what building one costs.
    Worker processes fork, so they inherit the patch."""
    monkeypatch.setattr(Tokenizer, "load", classmethod(lambda cls, spec, num_special_tokens=None: TOK))


@pytest.fixture(scope="module")
def keyset(tmp_path_factory):
    root, _ = key_dataset(tmp_path_factory.mktemp("resume"), TOK, shards=SHARDS, per_shard=PER_SHARD, image_every=5)
    return root


def take(loader, n=None):
    """n batches (all of them with None)."""
    out = []
    if n == 0:
        return out
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def check_resume_everywhere(args, in_process, min_epochs, n=None, batch_size=2):
    """For both ranks: save the state at every batch boundary of one run (n batches, or to the
    end) and check that a loader resumed from it yields exactly the rest of that run. Returns
    the states saved on the way."""
    args.tile_size = 56  # small tiles: the images still travel and are compared, at 1/36 of the cost
    kw = dict(world_size=2, batch_size=batch_size, seq_len=256, seed=3, num_workers=2, in_process=in_process)
    saved = []
    for rank in range(2):
        loader = MultimodalLoader(args, rank=rank, **kw)
        full, states = [], [roundtrip(loader.state_dict())]
        for b in loader:
            full.append(b)
            states.append(roundtrip(loader.state_dict()))
            if len(full) == n:
                break
        # every stream of this rank has read past `min_epochs` epoch ends
        epochs = [st["stream"]["sources"][0]["block_start"][0] for st in states[-1]["states"]]
        assert min(epochs) >= min_epochs, epochs
        assert any(b["images"].shape[0] for b in full)
        for i, state in enumerate(states):
            resumed = MultimodalLoader(args, rank=rank, **kw)
            resumed.load_state_dict(state)
            tail = take(resumed, None if n is None else n - i)
            assert len(tail) == len(full) - i, f"rank {rank}, resumed after batch {i}"
            for j, (x, y) in enumerate(zip(full[i:], tail)):
                try:
                    same_batch(x, y)
                except AssertionError as e:
                    raise AssertionError(f"rank {rank}, resumed after batch {i}: batch {i + j} differs ({e})")
        saved += states
    return saved


@pytest.mark.parametrize("in_process", [True, False], ids=["in_process", "workers"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_resume_at_every_batch_across_epoch_ends(keyset, in_process, shuffle):
    # shuffle_buffer 2: blocks end inside shards, at shard ends and at every epoch end (6 samples)
    args = DataArgs(urls=str(keyset), shuffle=shuffle, shuffle_buffer=2, resample=False)
    # worker processes start afresh for every resume: fewer, larger batches over the same span
    n, batch_size = (14, 2) if in_process else (7, 4)
    check_resume_everywhere(args, in_process, min_epochs=1, n=n, batch_size=batch_size)


@pytest.mark.parametrize("mixture", [False, True], ids=["one_source", "two_sources"])
def test_resume_at_every_batch_of_a_finite_run_with_bad_shards(keyset, tmp_path, mixture):
    """Two epochs to the end, over shards of different lengths and a shard that yields only an
    error item (the position after it is the next unit's start, or the end of the epoch); with
    a second, smaller source that runs out first and drops out of the mixture mid-run."""
    root = tmp_path / "mixed"
    root.mkdir()
    for p in sorted(keyset.glob("*.tar"))[:-1]:
        (root / p.name).symlink_to(p)
    write_tar(root / "short.tar", [{"__key__": "short-0", "txt": "1 2 3"}])
    (root / "part-9999.tar").write_bytes(b"not a tar" * 50)
    sources = [Source(str(root), 2.0)]
    if mixture:
        small = tmp_path / "small"
        small.mkdir()
        for s in range(4):
            write_tar(small / f"s-{s}.tar", [{"__key__": f"s{s}-{j}", "txt": f"{s} {j} " * 20} for j in range(2)])
        sources.append(Source(str(small), 1.0))
    args = DataArgs(sources=sources, shuffle=True, shuffle_buffer=3, epochs=2)
    states = check_resume_everywhere(args, in_process=True, min_epochs=1)
    active = {tuple(st["stream"]["active"]) for state in states for st in state["states"] if st is not None}
    assert (True, False) in active if mixture else active == {(True,), (False,)}
