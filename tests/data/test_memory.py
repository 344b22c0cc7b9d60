"""A loader reading hostile shards keeps its memory bounded: each attack is one skipped sample,
counted under its reason, and the good samples around it still come through.

The attacks are the ones seen in the audit, scaled down where that keeps the test fast (each
still well over its budget): a PNG referenced 200 times by one document, a 12 MB .txt, a
.tar.gz whose unused member inflates to 80 MB, a member name and a key that repeat, and videos
whose decoding costs too many pixels or frames. A separate process reads them through
MultimodalLoader and reports its own peak RSS.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data.tokenizer import Tokenizer

from datakit import doc_json, key_strings, mp4_bytes, write_members

TOK = Tokenizer.tiny()
ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30

READER = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from data.args import DataArgs
from data.loader import MultimodalLoader
overrides = json.loads(sys.argv[3])
args = DataArgs(urls=sys.argv[2], epochs=1, shuffle=False, **overrides)
loader = MultimodalLoader(args, batch_size=1, seq_len=2048, num_workers=0)
tokens = set()
for batch in loader:
    tokens |= set(batch["tokens"].flatten().tolist())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
print(json.dumps({"peak": peak, "skipped": loader.skipped, "tokens": sorted(tokens)}))
"""


def noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_hostile_shards_are_skipped_with_bounded_memory(tmp_path):
    words = key_strings(TOK, 8)
    good = [(f"good{i}.txt", words[i] + " 1 2 3") for i in range(7)]
    write_members(
        tmp_path / "a.tar",
        [
            good[0],
            # ~1.4 MB of PNG, each reference 10 tiles: ~2.7 GB of float pixels if decoded 200 times
            ("refs.json", doc_json(*[{"image": "png"}] * 200)),
            ("refs.png", noise_png(680)),
            good[1],
            ("long.txt", b"0123 4567 89 " * 1_000_000),  # 13 MB of text (budget: 4 MiB)
            good[2],
            ("twice.txt", "one"),
            ("twice.txt", "two"),
            good[3],
            ("good0.json", doc_json({"text": "a key seen before"})),
        ],
    )
    write_members(
        tmp_path / "b.tar.gz",
        [good[4], ("bomb.txt", "x"), ("bomb.unused.bin", 80 << 20), good[5]],  # 80 MB of zeros, 360 KB packed
        compress="gz",
    )
    write_members(
        tmp_path / "c.tar",
        [
            # 30 frames of 320x320 = 3.1M pixels (budget below: 2M); 300 frames at 300 fps sampled
            # at 1 frame/s decode 300 frames (budget below: 100)
            ("pixels.json", doc_json({"video": "mp4"})),
            ("pixels.mp4", mp4_bytes(frames=30, fps=30, size=(320, 320))),
            ("frames.json", doc_json({"video": "mp4"})),
            ("frames.mp4", mp4_bytes(frames=300, fps=300, size=(32, 32))),
            ("video.json", doc_json({"text": words[7]}, {"video": "mp4"})),
            ("video.mp4", mp4_bytes()),
            good[6],
        ],
    )
    overrides = {"max_sample_pixels": 2_000_000, "max_video_decode_frames": 100}
    run = subprocess.run(
        [sys.executable, "-c", READER, str(ROOT), str(tmp_path), json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert {k: v for k, v in report["skipped"].items() if v} == {
        "too_many_media": 1,
        "text_too_long": 1,
        "duplicate_member": 1,
        "duplicate_key": 1,
        "member_too_large": 1,
        "too_many_pixels": 1,
        "too_many_frames": 1,
    }
    assert {TOK.encode(w)[0] for w in words} <= set(report["tokens"])  # every good document came through
    assert TOK.ids.video_start in report["tokens"]
    assert report["peak"] < GIB, f"peak RSS {report['peak'] / 2**20:.0f} MiB"
