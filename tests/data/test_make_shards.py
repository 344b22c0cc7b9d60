"""launch/make_shards.py: a used output directory is refused or replaced whole, and symlinks in
the inputs do not lead out of the input tree."""

import importlib.util
import os
import tarfile
from pathlib import Path

import pytest

import data.sample

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_shards", ROOT / "launch" / "make_shards.py")
make_shards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shards)


def texts(out: Path) -> list[str]:
    """Every txt member of every shard in out, in shard order."""
    found = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            found += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    return found


def notes(root: Path, *items: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(items):
        (root / f"n{i}.txt").write_text(text)
    return root


def test_a_used_out_is_refused_and_overwrite_replaces_the_whole_set(tmp_path, monkeypatch):
    out = tmp_path / "out"
    v1 = notes(tmp_path / "v1", "old a", "old b")
    make_shards.main(["--out", str(out), "--text-dir", str(v1), "--max-count", "1"])
    assert texts(out) == ["old a", "old b"] and len(list(out.glob("*.tar"))) == 2
    v2 = notes(tmp_path / "v2", "new")
    with pytest.raises(SystemExit, match="is not empty .* --overwrite"):
        make_shards.main(["--out", str(out), "--text-dir", str(v2)])
    assert texts(out) == ["old a", "old b"]

    real_write = data.sample.write_shards

    def write_while_checking(samples, where, *args):
        assert Path(where) != out and texts(out) == ["old a", "old b"]  # the old set, whole, until the swap
        return real_write(samples, where, *args)

    monkeypatch.setattr(make_shards, "write_shards", write_while_checking)
    make_shards.main(["--out", str(out), "--text-dir", str(v2), "--overwrite"])
    assert texts(out) == ["new"]  # shard-000001.tar of the old set is gone too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v1", "v2"]  # no scratch directories

    def disk_full(samples, where, *args):
        real_write(samples[:1], where, *args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(make_shards, "write_shards", disk_full)
    with pytest.raises(OSError, match="No space"):
        make_shards.main(["--out", str(out), "--text-dir", str(v2), "--overwrite"])
    assert texts(out) == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["out", "v1", "v2"]


def test_overwrite_deletes_only_a_directory_of_shards(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.tar").write_bytes(b"")
    (out / "notes.md").write_text("mine")
    with pytest.raises(SystemExit, match="also holds notes.md; not deleting it"):
        make_shards.main(["--out", str(out), "--text-dir", str(notes(tmp_path / "in", "x")), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "old.tar"]


def test_symlinks_leading_out_of_an_input_tree_are_skipped_unless_asked(tmp_path, capsys):
    outside = notes(tmp_path / "outside", "credentials")
    tree = notes(tmp_path / "tree", "inside")
    (tree / "sub").mkdir()
    (tree / "sub" / "deep.txt").write_text("deep")
    os.symlink(tree / "n0.txt", tree / "alias.txt")  # inside the tree: read
    os.symlink(tree / "sub", tree / "sub-link")  # a directory inside the tree: read once, under sub/
    os.symlink(tree, tree / "sub" / "loop")  # a cycle: walked once
    os.symlink(outside / "n0.txt", tree / "secret.txt")  # out of the tree: skipped
    os.symlink(outside, tree / "elsewhere")  # a directory out of the tree: skipped
    got = sorted(s["txt"] for s in make_shards.text_samples(tree))
    assert got == ["deep", "inside", "inside"]
    err = capsys.readouterr().err
    assert "skipping" in err and "secret.txt" in err and "elsewhere" in err and "--follow-symlinks" in err
    got = sorted(s["txt"] for s in make_shards.text_samples(tree, follow_symlinks=True))
    assert got == ["credentials", "credentials", "deep", "inside", "inside"]

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.png").write_bytes(b"png bytes are stored as they are")
    os.symlink(outside / "n0.txt", photos / "cat.txt")  # a caption leading out of the tree
    (sample,) = make_shards.media_samples(photos, "image", ("png",))
    assert "credentials" not in sample["json"] and "cat.txt" in capsys.readouterr().err
    (sample,) = make_shards.media_samples(photos, "image", ("png",), follow_symlinks=True)
    assert "credentials" in sample["json"]
