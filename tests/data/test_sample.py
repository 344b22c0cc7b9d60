import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.args import DataArgs
from data.loader import MultimodalLoader
import data.sample
from data.sample import SAMPLE_SHARDS, ensure_sample
from data.tokenizer import Tokenizer

from datakit import check_batch, mp4_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_sample_builds_once_and_feeds_two_ranks_two_workers(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HERD_DATA_CACHE", str(tmp_path))
    caplog.set_level(logging.INFO, logger="herd")
    out = ensure_sample()  # the directory `data.urls=sample` uses
    assert out.parent == tmp_path
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == SAMPLE_SHARDS and sum(p.stat().st_size for p in shards) < 4e6
    start, done = [r.getMessage() for r in caplog.records]  # one line as it starts, one when done
    assert f"building the sample shards in {out}" in start
    assert f"built {SAMPLE_SHARDS} sample shards (" in done and " documents) in " in done and done.endswith(" s")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no scratch directory left
    caplog.clear()
    stamp = [p.stat().st_mtime_ns for p in shards]
    assert ensure_sample(out) == out and [p.stat().st_mtime_ns for p in shards] == stamp
    assert not caplog.records  # already built: silent
    tok = Tokenizer.tiny()
    tiles = 0
    kinds = set()
    for rank in range(2):
        loader = MultimodalLoader(
            DataArgs(urls="sample", epochs=1),
            rank=rank,
            world_size=2,
            batch_size=2,
            seq_len=1024,
            num_workers=2,
            in_process=True,
        )
        for b in loader:
            check_batch(b, tok)
            tiles += b["images"].shape[0]
            kinds |= {k for k in (tok.ids.tile_x, tok.ids.video_start) if bool((b["tokens"] == k).any())}
        assert loader.urls == [[str(p) for p in shards]]
        assert sum(loader.skipped.values()) == 0 and loader.documents > 40
    assert tiles > 50 and kinds == {tok.ids.tile_x, tok.ids.video_start}  # multi-tile images and videos


def test_make_shards_from_folders_and_jsonl(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("alpha text")
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(tmp_path / "img" / "cat.v2.png")
    (tmp_path / "img" / "cat.v2.txt").write_text("a black cat")
    (tmp_path / "vid.mp4").write_bytes(mp4_bytes())
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"segments": [{"text": "see"}, {"image": "img/cat.v2.png"}, {"video": "vid.mp4"}, {"text": "done"}]})
        + "\n"
    )
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "make_shards.py"),
        "--out",
        str(tmp_path / "out"),
        "--text-dir",
        str(tmp_path / "txt"),
        "--image-dir",
        str(tmp_path / "img"),
        "--jsonl",
        str(tmp_path / "docs.jsonl"),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    loader = MultimodalLoader(DataArgs(urls=str(tmp_path / "out"), epochs=1, shuffle=False), batch_size=1, seq_len=2048)
    (batch,) = list(loader)
    tok = loader.tokenizer
    check_batch(batch, tok)
    assert sum(loader.skipped.values()) == 0 and batch["documents"] == 3
    # the png in its own document and in the jsonl one, plus one frame: the clip lasts 1 s, sampled at 1 frame/s
    assert batch["images"].shape[0] == 1 + 1 + 1


def test_concurrent_builders_first_rename_wins(tmp_path, monkeypatch, caplog):
    """Another process completes the set while this one builds: this one's copy is dropped and
    the complete one is used. A directory in the way that is not complete is an error, and a
    build that fails leaves no scratch directory behind."""
    tiny = [{"__key__": f"t{i}", "txt": f"text {i}"} for i in range(3)]
    monkeypatch.setattr(data.sample, "sample_documents", lambda: list(tiny))
    out = tmp_path / "sample"
    real_write = data.sample._write_sample

    def rival_finishes_first(samples, where):
        real_write(samples, out)  # the other process's build, already renamed into place
        (out / "COMPLETE").write_text("done\n")
        return real_write(samples, where)

    monkeypatch.setattr(data.sample, "_write_sample", rival_finishes_first)
    caplog.set_level(logging.INFO, logger="herd")
    assert ensure_sample(out) == out
    assert "another process finished" in caplog.records[-1].getMessage()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample"]  # this one's copy is gone
    assert (out / "COMPLETE").read_text() == "done\n"

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "half.tar").write_bytes(b"")
    monkeypatch.setattr(data.sample, "_write_sample", real_write)
    with pytest.raises(RuntimeError, match="not a complete sample set; delete it"):
        ensure_sample(stray)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample", "stray"]

    def disk_full(samples, where):
        real_write(samples[:1], where)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.sample, "_write_sample", disk_full)
    with pytest.raises(OSError, match="No space left"):  # the build's own error, not "delete it"
        ensure_sample(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample", "stray"]  # its scratch copy is gone
