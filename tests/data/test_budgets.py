"""Budgets: every overrun is one skipped sample, counted under its own reason, decided before the
expensive part (tar headers before reading a member, the document before decoding media, an
image's header before decoding it, video frames as they come out of the decoder)."""

import io
import tarfile

import pytest
from PIL import Image

from data.args import DataArgs
from data.decode import DecodeOptions, SkipSample, decode_sample
from data.loader import MultimodalLoader
from data.shards import MAX_HEADER_BYTES, ReadLimits, ReadUnit, read_unit
from data.stream import SourceStream
from data.tokenizer import Tokenizer

from datakit import doc_json, key_strings, mp4_bytes, png_bytes, write_members, write_tar

TOK = Tokenizer.tiny()
DECODED = frozenset({"json", "txt", "png", "jpg", "mp4"})


@pytest.fixture
def extracted(monkeypatch):
    """Names of the tar members read into memory."""
    names = []
    real = tarfile.TarFile.extractfile

    def spy(self, member):
        names.append(member.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    return names


def read(path, **limits):
    limits.setdefault("exts", DECODED)
    return [item for _, item in read_unit(ReadUnit(str(path)), limits=ReadLimits(**limits))]


def summary(items):
    return [(i["__key__"], i.get("__error__")) for i in items]


@pytest.mark.parametrize("compress", ["", "gz"])
def test_a_member_over_budget_is_never_read_and_skips_only_its_sample(tmp_path, extracted, compress):
    path = write_members(
        tmp_path / ("s.tar.gz" if compress else "s.tar"),
        [
            ("a.txt", "first"),
            ("big.json", doc_json({"text": "x"})),
            ("big.unused.bin", 3_000_000),  # never decoded, and over the budget
            ("b.txt", "last"),
        ],
        compress,
    )
    items = read(path, max_member_bytes=1_000_000)
    assert summary(items) == [("a", None), ("big", "member_too_large"), ("b", None)]
    assert "big.unused.bin" not in extracted and "big.json" in extracted
    assert items[2]["txt"] == b"last"  # the reader went on past the skipped bytes


def test_members_nothing_decodes_are_not_read_and_unused_ones_are_dropped(tmp_path, extracted):
    png = png_bytes()
    write_members(
        tmp_path / "s.tar",
        [
            ("d.0.png", png),
            ("d.1.png", png),  # not named by the document
            ("d.blob.bin", b"\x80\x04 pickle-ish"),  # a type nothing decodes
            ("d.json", doc_json({"text": "see"}, {"image": "0.png"})),
        ],
    )
    (raw,) = read(tmp_path / "s.tar")
    assert "d.blob.bin" not in extracted and sorted(k for k in raw if not k.startswith("__")) == [
        "0.png",
        "1.png",
        "json",
    ]
    urls = [str(tmp_path / "s.tar")]
    stream = SourceStream(urls, 0, 1, seed=0, source=0, args=DataArgs(urls=urls, epochs=1))
    held = stream.next_item()  # what waits in the shuffle block
    assert sorted(k for k in held if not k.startswith("__")) == ["0.png", "json"]
    assert len(decode_sample(held, DecodeOptions())) == 2


def test_sample_and_text_bytes_are_judged_from_headers(tmp_path, extracted):
    write_members(
        tmp_path / "s.tar",
        [
            ("ok.0.png", 1000),
            ("ok.txt", "fine"),
            ("many.0.png", 1000),
            ("many.1.png", 1000),
            ("many.2.png", 1000),  # three members of 1000 bytes + headers > 3000
            ("many.txt", "x"),
            ("long.json", doc_json({"text": "y" * 2000})),
            ("after.txt", "z"),
        ],
    )
    items = read(tmp_path / "s.tar", max_sample_bytes=3000, max_text_bytes=1000)
    assert summary(items) == [
        ("ok", None),
        ("many", "sample_too_large"),
        ("long", "text_too_long"),
        ("after", None),
    ]
    assert "many.2.png" not in extracted and "long.json" not in extracted
    # decode_sample applies the text budget too, for samples that did not come through read_unit
    with pytest.raises(SkipSample, match="text_too_long"):
        decode_sample({"__key__": "t", "txt": b"w" * 101}, DecodeOptions(max_text_bytes=100))


def test_duplicate_members_and_keys_skip_one_sample_not_the_shard(tmp_path):
    words = key_strings(TOK, 4)
    write_members(
        tmp_path / "dup.tar",
        [
            ("a.txt", words[0]),
            ("twice.txt", "one"),
            ("twice.TXT", "two"),  # the same member name (extensions are compared in lower case)
            ("b.txt", words[1]),
            ("a.json", doc_json({"text": "a again, after other samples"})),
            ("c.txt", words[2]),
        ],
    )
    assert summary(read(tmp_path / "dup.tar")) == [
        ("a", None),
        ("twice", "duplicate_member"),
        ("b", None),
        ("a", "duplicate_key"),
        ("c", None),
    ]
    loader = MultimodalLoader(DataArgs(urls=str(tmp_path), epochs=1), batch_size=1, seq_len=64)
    tokens = {t for b in loader for t in b["tokens"].flatten().tolist()}
    assert {TOK.encode(w)[0] for w in words[:3]} <= tokens
    assert {k: v for k, v in loader.skipped.items() if v} == {"duplicate_member": 1, "duplicate_key": 1}


def test_resumed_reading_still_knows_earlier_keys(tmp_path):
    write_members(tmp_path / "s.tar", [("a.txt", "1"), ("b.txt", "2"), ("a.json", doc_json({"text": "3"}))])
    got = [(i, item.get("__error__")) for i, item in read_unit(ReadUnit(str(tmp_path / "s.tar")), start=2)]
    assert got == [(2, "duplicate_key")]


def test_an_oversized_extended_header_ends_the_shard(tmp_path):
    """tarfile reads a pax header whole, whatever size it claims: one over MAX_HEADER_BYTES
    ends the shard instead (the sample being assembled is lost with it, as for any break)."""
    names = ["d/" + "n" * 300 + ".txt", "e.txt", "f/" + "m" * (MAX_HEADER_BYTES + 10) + ".txt"]
    with tarfile.open(tmp_path / "s.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:  # the first: a long name in a pax header of its own, which is fine
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    items = read(tmp_path / "s.tar")
    assert [i.get("__error__") for i in items] == [None, "truncated_tar"]
    assert items[0]["__key__"] == names[0][:-4] and "extended header of" in items[1]["__detail__"]


# -- decode budgets --------------------------------------------------------------------------
def image_doc(n_refs: int, png: bytes) -> dict:
    return {"__key__": "d", "json": doc_json(*[{"image": "png"}] * n_refs).encode(), "png": png}


def test_media_references_are_counted_before_anything_is_decoded():
    png = png_bytes()
    assert len(decode_sample(image_doc(4, png), DecodeOptions(max_media_per_sample=4))) == 4
    with pytest.raises(SkipSample, match="too_many_media"):
        decode_sample(image_doc(5, b"not even an image"), DecodeOptions(max_media_per_sample=4))


def test_image_pixels_are_counted_from_the_header_before_decoding():
    png = png_bytes(40, 30)
    assert len(decode_sample(image_doc(3, png), DecodeOptions(max_sample_pixels=3 * 1200))) == 3
    with pytest.raises(SkipSample, match="too_many_pixels"):
        decode_sample(image_doc(4, png), DecodeOptions(max_sample_pixels=3 * 1200))
    # a header promising 2000x2000 over truncated data: refused by the budget, never decoded
    solid = io.BytesIO()
    Image.new("RGB", (2000, 2000)).save(solid, format="PNG")
    header_only = solid.getvalue()[:60]
    with pytest.raises(SkipSample, match="too_many_pixels"):
        decode_sample(image_doc(1, header_only), DecodeOptions(max_sample_pixels=1_000_000))
    with pytest.raises(SkipSample, match="corrupt_image"):
        decode_sample(image_doc(1, header_only), DecodeOptions())


def video_doc(mp4: bytes, copies: int = 1) -> dict:
    return {"__key__": "v", "json": doc_json(*[{"video": "mp4"}] * copies).encode(), "mp4": mp4}


def test_video_frames_pixels_and_time_are_budgets_per_sample():
    # 12 frames at 12 fps sampled once a second: every frame is decoded, one is kept
    mp4 = mp4_bytes(frames=12, fps=12)
    (seg,) = decode_sample(video_doc(mp4), DecodeOptions(max_video_decode_frames=12))
    assert seg.pixels.shape[0] == 1
    with pytest.raises(SkipSample, match="too_many_frames"):
        decode_sample(video_doc(mp4), DecodeOptions(max_video_decode_frames=11))
    # the budget is the sample's: two copies need twice the frames
    with pytest.raises(SkipSample, match="too_many_frames"):
        decode_sample(video_doc(mp4, 2), DecodeOptions(max_video_decode_frames=20))
    frame = 64 * 48
    assert len(decode_sample(video_doc(mp4), DecodeOptions(max_sample_pixels=12 * frame))) == 1
    with pytest.raises(SkipSample, match="too_many_pixels"):
        decode_sample(video_doc(mp4), DecodeOptions(max_sample_pixels=12 * frame - 1))
    with pytest.raises(SkipSample, match="video_decode_timeout"):
        decode_sample(video_doc(mp4), DecodeOptions(max_video_decode_seconds=1e-9))


# -- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field",
    [
        "max_member_bytes",
        "max_sample_bytes",
        "max_text_bytes",
        "max_media_per_sample",
        "max_sample_pixels",
        "max_video_decode_frames",
        "shuffle_buffer_bytes",
        "max_video_decode_seconds",
    ],
)
def test_budgets_must_be_positive(field):
    with pytest.raises(ValueError, match=f"data.{field}=0"):
        DataArgs(**{field: 0}).validate()


def test_shuffle_blocks_end_at_a_byte_budget_and_resume_exactly(tmp_path):
    write_tar(tmp_path / "s.tar", [{"__key__": f"k{j:02d}", "txt": "x" * 100} for j in range(20)])
    urls = [str(tmp_path / "s.tar")]
    args = DataArgs(urls=urls, epochs=1, shuffle_buffer=64, shuffle_buffer_bytes=500)
    stream = SourceStream(urls, 0, 1, seed=0, source=0, args=args)
    first = [stream.next_item()["__key__"] for _ in range(5)]
    assert sorted(first) == [f"k{j:02d}" for j in range(5)] and first != sorted(first)  # one block of 5
    state = stream.state_dict()
    rest = [stream.next_item()["__key__"] for _ in range(15)]
    resumed = SourceStream(urls, 0, 1, seed=0, source=0, args=args)
    resumed.load_state_dict(state)
    assert [resumed.next_item()["__key__"] for _ in range(15)] == rest
