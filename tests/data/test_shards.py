import pytest

from data.args import DataArgs
from data.loader import MultimodalLoader
from data.shards import ReadLimits, ReadUnit, expand_shards, plan_epoch, read_unit

from datakit import write_tar


def _tars(tmp_path, n):
    for i in range(n):
        write_tar(tmp_path / f"p-{i:03d}.tar", [{"__key__": f"k{i}-{j}", "txt": f"{i} {j}"} for j in range(3)])
    return sorted(str(p) for p in tmp_path.glob("*.tar"))


def test_expand_directory_brace_pipe_and_list(tmp_path):
    paths = _tars(tmp_path, 3)
    assert expand_shards(str(tmp_path)) == paths
    assert expand_shards(str(tmp_path / "p-{000..002}.tar")) == paths
    assert expand_shards(f"{paths[0]}::{paths[1]}") == paths[:2]
    assert expand_shards(f"pipe:cat {tmp_path}/p-{{000..001}}.tar") == [f"pipe:cat {p}" for p in paths[:2]]
    assert expand_shards([paths[2], str(tmp_path / "p-00{0..1}.tar")]) == [paths[2]] + paths[:2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar"):
        expand_shards(str(tmp_path / "empty"))


def test_missing_local_paths_fail_early_with_one_short_message(tmp_path):
    paths = _tars(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match=r"'/no/such/dir' does not exist; give a directory of \.tar shards, "
                       r"a brace pattern .*, or pipe:CMD"):
        expand_shards("/no/such/dir")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_shards(f"file://{tmp_path}/nope.tar")
    # a brace pattern expands first: each piece is checked, and 1000 pieces make one short message
    with pytest.raises(FileNotFoundError) as e:
        expand_shards(str(tmp_path / "p-{000000..000999}.tar"))
    msg = str(e.value)
    assert "1000 of the 1000 shard paths" in msg and "p-{000000..000999}.tar" in msg
    assert "p-000000.tar', " in msg and "p-000003.tar" not in msg and len(msg) < 600
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 shard paths .*\('/nope\.tar'\)"):
        expand_shards(paths + ["/nope.tar"])
    # pipe: commands and remote urls are only checked when they are read
    assert expand_shards("pipe:cat /nope-{0..1}.tar") == ["pipe:cat /nope-0.tar", "pipe:cat /nope-1.tar"]
    remote = ["s3://bucket/a.tar", "gs://bucket/b.tar", "https://host/c.tar", "http://host/d.tar"]
    assert expand_shards(remote) == remote


@pytest.mark.parametrize("n_shards,streams", [(8, 4), (9, 4), (3, 4), (2, 6), (1, 3)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_belongs_to_exactly_one_stream(n_shards, streams, shuffle):
    urls = [f"s{i}" for i in range(n_shards)]
    per_shard = 5
    owners = {}
    for stream in range(streams):
        for unit in plan_epoch(urls, stream, streams, seed=3, source=0, epoch=1, shuffle=shuffle):
            for j in range(per_shard):
                if j % unit.stride == unit.offset:
                    assert (unit.url, j) not in owners
                    owners[(unit.url, j)] = stream
    assert len(owners) == n_shards * per_shard
    if n_shards >= streams:  # whole shards: no stream reads a shard another reads
        assert all(len({s for (u, _), s in owners.items() if u == url}) == 1 for url in urls)


def test_epochs_reshuffle_shards():
    urls = [f"s{i}" for i in range(16)]
    a = plan_epoch(urls, 0, 2, seed=1, source=0, epoch=0, shuffle=True)
    b = plan_epoch(urls, 0, 2, seed=1, source=0, epoch=1, shuffle=True)
    assert a != b and a == plan_epoch(urls, 0, 2, seed=1, source=0, epoch=0, shuffle=True)


def test_read_unit_resumes_and_reports_errors(tmp_path):
    paths = _tars(tmp_path, 1)
    got = [(i, s["__key__"]) for i, s in read_unit(ReadUnit(paths[0]), start=1)]
    assert got == [(1, "k0-1"), (2, "k0-2")]
    missing = list(read_unit(ReadUnit(str(tmp_path / "nope.tar"))))
    assert len(missing) == 1 and missing[0][1]["__error__"] == "unreadable_shard"
    piped = ReadLimits(allow_pipe=True)  # pipe: urls run a shell command only when opted in
    failing = list(read_unit(ReadUnit("pipe:exit 3"), limits=piped))
    assert [x[1]["__error__"] for x in failing] == ["unreadable_shard"]
    via_pipe = [s["__key__"] for _, s in read_unit(ReadUnit(f"pipe:cat {paths[0]}"), limits=piped)]
    assert via_pipe == ["k0-0", "k0-1", "k0-2"]


@pytest.mark.parametrize(
    "args,where",
    [
        (dict(urls="pipe:cat /data/a.tar"), "data.urls"),
        (dict(urls=["/data/b.tar", " pipe:cat /data/a.tar"]), "data.urls"),
        (dict(urls="/data/b.tar::pipe:cat /data/a.tar"), "data.urls"),
        (dict(sources=[{"urls": "/data/b"}, {"urls": "pipe:cat /data/a.tar"}]), r"data.sources\[1\].urls"),
    ],
)
def test_pipe_urls_need_an_opt_in_at_start_up(args, where):
    expected = rf"{where}: 'pipe:cat /data/a.tar' runs a shell command.*data.allow_pipe=true"
    with pytest.raises(ValueError, match=expected):
        DataArgs(**args).validate()
    DataArgs(**args, allow_pipe=True).validate()


def test_pipe_urls_run_only_when_allowed(tmp_path):
    marker = tmp_path / "ran"
    (item,) = [x for _, x in read_unit(ReadUnit(f"pipe:touch {marker}"))]
    assert item["__error__"] == "unreadable_shard" and "data.allow_pipe=true" in item["__detail__"]
    assert not marker.exists()  # refused before anything ran, even past validate()
    paths = _tars(tmp_path, 1)
    with pytest.raises(ValueError, match="allow_pipe"):
        MultimodalLoader(DataArgs(urls=f"pipe:cat {paths[0]}", epochs=1), batch_size=1, seq_len=64)
    allowed = DataArgs(urls=f"pipe:cat {paths[0]}", epochs=1, allow_pipe=True)
    loader = MultimodalLoader(allowed, batch_size=1, seq_len=64)
    assert len(list(loader)) >= 1 and loader.documents == 3
