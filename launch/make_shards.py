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

The output directory must be empty or new; --overwrite replaces a directory of shards as a whole
(the new set is written beside it and swapped in, so a reader never sees a mix of old and new
shards). Symlinks in the input directories are followed only while they stay inside that
directory, unless --follow-symlinks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.decode import IMAGE_EXTS, VIDEO_EXTS  # noqa: E402
from data.shards import TAR_SUFFIXES  # noqa: E402
from data.sample import build_sample, train_tiny_tokenizer, write_shards  # noqa: E402


def sample_key(prefix: str, rel: str) -> str:
    # webdataset splits a member name at the first dot of its base name: keys must have none
    return f"{prefix}-" + re.sub(r"[^A-Za-z0-9_-]+", "_", rel)


def _ext(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def _inside(path: Path, real_root: Path) -> bool:
    real = path.resolve()
    return real == real_root or real_root in real.parents


def _skip_link(path: Path, root: Path) -> None:
    print(
        f"make_shards: skipping {path} -> {os.path.realpath(path)}: it leads out of {root} "
        "(--follow-symlinks includes it)",
        file=sys.stderr,
    )


def input_files(root: Path, exts: tuple[str, ...], follow_symlinks: bool = False) -> list[Path]:
    """The files under root with these extensions, sorted. A symlink (to a file or a directory)
    that leads outside root is skipped with a note unless follow_symlinks: a tree of notes must
    not pack whatever a link in it points to. A symlinked directory inside root is not descended
    (its files are read under their own path); each directory is walked once."""
    real_root = root.resolve()
    found, walked = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if here.resolve() in walked:
            dirnames[:] = []
            continue
        walked.add(here.resolve())
        keep = []
        for name in dirnames:
            sub = here / name
            if not sub.is_symlink():
                keep.append(name)
            elif _inside(sub, real_root):
                continue  # walked under its own path
            elif follow_symlinks:
                keep.append(name)
            else:
                _skip_link(sub, root)
        dirnames[:] = keep
        for name in filenames:
            path = here / name
            if _ext(path) not in exts or not path.is_file():
                continue
            if not follow_symlinks and not _inside(path, real_root):
                _skip_link(path, root)
                continue
            found.append(path)
    return sorted(found)


def text_samples(root: Path, follow_symlinks: bool = False):
    for path in input_files(root, ("txt", "md"), follow_symlinks):
        yield {"__key__": sample_key("text", str(path.relative_to(root))), "txt": path.read_text(encoding="utf-8")}


def media_samples(root: Path, kind: str, exts: tuple[str, ...], follow_symlinks: bool = False):
    real_root = root.resolve()
    for path in input_files(root, exts, follow_symlinks):
        segments = [{kind: _ext(path)}]
        caption = path.with_suffix(".txt")
        if caption.is_file() and not follow_symlinks and not _inside(caption, real_root):
            _skip_link(caption, root)
        elif caption.is_file():
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


def check_out(out: Path, overwrite: bool) -> None:
    """`out` must be new or empty; with overwrite it may hold shards (and nothing else, which
    would be deleted with them)."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"make_shards: {out} exists and is not a directory")
    existing = sorted(out.iterdir()) if out.is_dir() else []
    if existing and not overwrite:
        raise SystemExit(
            f"make_shards: {out} is not empty ({len(existing)} entries, e.g. {existing[0].name}); training would "
            "read any old shards left there. Give a new directory, or --overwrite to replace its shards"
        )
    others = [p for p in existing if not (p.is_file() and p.name.endswith(TAR_SUFFIXES)) and p.name != "COMPLETE"]
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise SystemExit(
            f"make_shards: --overwrite replaces a directory of shards, but {out} also holds {others[0].name}{more}; "
            "not deleting it"
        )


def replace_dir(out: Path, build) -> list[Path]:
    """build(tmp) into a new directory beside `out`, then swap it into out's place with two
    renames, so `out` never holds a mix of old and new shards; the old set is then deleted.
    (A run that listed the old shards before the swap keeps reading by those names: rebuild
    between runs, not under one.)"""
    out = Path(os.path.realpath(out))  # swap the directory a symlink names, not the link
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = out.with_name(f".{out.name}.new-{tag}"), out.with_name(f".{out.name}.old-{tag}")
    try:
        names = [p.name for p in build(tmp)]
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return [out / name for name in names]


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
    ap.add_argument("--overwrite", action="store_true", help="replace the shards in a non-empty --out/--sample DIR")
    ap.add_argument(
        "--follow-symlinks", action="store_true", help="also read symlinks that lead out of the input directories"
    )
    a = ap.parse_args(argv)

    if a.sample:
        check_out(Path(a.sample), a.overwrite)
        paths = replace_dir(Path(a.sample), build_sample)
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
        out = Path(a.out)
        check_out(out, a.overwrite)  # before any input is read
        samples = []
        if a.text_dir:
            samples += text_samples(a.text_dir, a.follow_symlinks)
        if a.image_dir:
            samples += media_samples(a.image_dir, "image", IMAGE_EXTS, a.follow_symlinks)
        if a.video_dir:
            samples += media_samples(a.video_dir, "video", VIDEO_EXTS, a.follow_symlinks)
        for path in a.jsonl:
            samples += jsonl_samples(path)
        if a.shuffle_seed is not None:
            random.Random(a.shuffle_seed).shuffle(samples)
        paths = replace_dir(out, lambda d: write_shards(samples, d, a.prefix, a.max_count, a.max_size))
        print(f"wrote {len(samples)} samples in {len(paths)} shards to {a.out}")
    elif not (a.sample or a.tiny_tokenizer):
        ap.error("nothing to do: give --sample DIR, or --out DIR with inputs")


if __name__ == "__main__":
    main()
