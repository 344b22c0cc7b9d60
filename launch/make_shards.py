"""Build webdataset shards for herd from local material.

    python launch/make_shards.py --sample DIR                 # the embedded sample set
    python launch/make_shards.py --out DIR --text-dir notes/ --image-dir photos/ \
        --video-dir clips/ --jsonl docs.jsonl --max-count 1000

Inputs (any mix; read in sorted order, so the same inputs give the same shards):
  --text-dir   every *.txt / *.md file becomes one plain-text sample
  --image-dir  every jpg/jpeg/png/webp becomes an image document; a sibling <name>.txt is its caption
  --video-dir  every mp4/webm likewise
  --jsonl      one interleaved document per line: {"segments": [{"text": ...}, {"image": "path"},
               {"video": "path"}]}, media paths relative to the jsonl file
Media bytes are stored as they are (no re-encoding). The format is described in docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.decode import IMAGE_EXTS, VIDEO_EXTS  # noqa: E402
from data.sample import build_sample, train_tiny_tokenizer, write_shards  # noqa: E402


def sample_key(prefix: str, rel: str) -> str:
    # webdataset splits a member name at the first dot of its base name: keys must have none
    return f"{prefix}-" + re.sub(r"[^A-Za-z0-9_-]+", "_", rel)


def _ext(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def text_samples(root: Path):
    for path in sorted(p for p in root.rglob("*") if p.is_file() and _ext(p) in ("txt", "md")):
        yield {"__key__": sample_key("text", str(path.relative_to(root))), "txt": path.read_text(encoding="utf-8")}


def media_samples(root: Path, kind: str, exts: tuple[str, ...]):
    for path in sorted(p for p in root.rglob("*") if p.is_file() and _ext(p) in exts):
        segments = [{kind: _ext(path)}]
        caption = path.with_suffix(".txt")
        if caption.is_file():
            segments.append({"text": caption.read_text(encoding="utf-8")})
        yield {
            "__key__": sample_key(kind, str(path.relative_to(root))),
            _ext(path): path.read_bytes(),
            "json": json.dumps({"segments": segments}, ensure_ascii=False),
        }


def jsonl_samples(path: Path):
    base = path.parent
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{where}: not JSON ({exc})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("segments"), list):
                raise SystemExit(f'{where}: expected {{"segments": [...]}}')
            sample, segments = {"__key__": sample_key(path.stem, f"{lineno:08d}")}, []
            for seg in doc["segments"]:
                kind = next((k for k in ("text", "image", "video") if isinstance(seg, dict) and k in seg), None)
                if kind is None:
                    raise SystemExit(f"{where}: segment {seg!r} needs one of text/image/video")
                if kind == "text":
                    segments.append({"text": seg["text"]})
                    continue
                media = Path(seg[kind]) if os.path.isabs(seg[kind]) else base / seg[kind]
                allowed = IMAGE_EXTS if kind == "image" else VIDEO_EXTS
                if _ext(media) not in allowed or not media.is_file():
                    raise SystemExit(f"{where}: {kind} {seg[kind]!r} is not an existing {'/'.join(allowed)} file")
                member = f"{len(segments)}.{_ext(media)}"
                sample[member] = media.read_bytes()
                segments.append({kind: member})
            sample["json"] = json.dumps({"segments": segments}, ensure_ascii=False)
            yield sample


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", metavar="DIR", help="write the embedded sample set into DIR")
    ap.add_argument("--tiny-tokenizer", metavar="PATH", help="retrain the tiny tokenizer (data/assets) into PATH")
    ap.add_argument("--out", metavar="DIR", help="output directory for shards built from the inputs below")
    ap.add_argument("--text-dir", type=Path)
    ap.add_argument("--image-dir", type=Path)
    ap.add_argument("--video-dir", type=Path)
    ap.add_argument("--jsonl", type=Path, action="append", default=[])
    ap.add_argument("--prefix", default="shard", help="shard file prefix (default: shard)")
    ap.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    ap.add_argument("--max-size", type=float, default=1e9, help="bytes per shard")
    ap.add_argument("--shuffle-seed", type=int, default=None, help="shuffle samples (seeded) before writing")
    a = ap.parse_args(argv)

    if a.sample:
        paths = build_sample(a.sample)
        print(f"wrote {len(paths)} sample shards to {a.sample}")
    if a.tiny_tokenizer:
        train_tiny_tokenizer(a.tiny_tokenizer)
        print(f"wrote {a.tiny_tokenizer}")
    inputs = [a.text_dir, a.image_dir, a.video_dir, *a.jsonl]
    if any(inputs):
        if not a.out:
            ap.error("--out DIR is required with --text-dir/--image-dir/--video-dir/--jsonl")
        for p in filter(None, inputs):
            if not p.exists():
                ap.error(f"{p} does not exist")
        samples = []
        if a.text_dir:
            samples += text_samples(a.text_dir)
        if a.image_dir:
            samples += media_samples(a.image_dir, "image", IMAGE_EXTS)
        if a.video_dir:
            samples += media_samples(a.video_dir, "video", VIDEO_EXTS)
        for path in a.jsonl:
            samples += jsonl_samples(path)
        if a.shuffle_seed is not None:
            random.Random(a.shuffle_seed).shuffle(samples)
        paths = write_shards(samples, a.out, a.prefix, a.max_count, a.max_size)
        print(f"wrote {len(samples)} samples in {len(paths)} shards to {a.out}")
    elif not (a.sample or a.tiny_tokenizer):
        ap.error("nothing to do: give --sample DIR, or --out DIR with inputs")


if __name__ == "__main__":
    main()
