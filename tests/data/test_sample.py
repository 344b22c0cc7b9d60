import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data.args import DataArgs
from data.loader import MultimodalLoader
from data.sample import SAMPLE_SHARDS, ensure_sample
from data.tokenizer import Tokenizer

from datakit import check_batch, mp4_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_sample_builds_once_and_feeds_two_ranks_two_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_DATA_CACHE", str(tmp_path))
    out = ensure_sample()  # the directory `data.urls=sample` uses
    assert out.parent == tmp_path
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == SAMPLE_SHARDS and sum(p.stat().st_size for p in shards) < 4e6
    stamp = [p.stat().st_mtime_ns for p in shards]
    assert ensure_sample(out) == out and [p.stat().st_mtime_ns for p in shards] == stamp
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
