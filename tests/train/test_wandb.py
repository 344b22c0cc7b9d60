"""wandb logging: offline files that `wandb sync` accepts, holding the logged keys and config;
the same wandb run after a resume; nothing at all when disabled or off rank 0."""
import glob
import json
import logging
import os
import struct
import subprocess
import sys
import time
import zlib

import pytest

from tests.helpers import ROOT
from train import wandb_log
from train.config import WandbConfig
from train.wandb_log import WandbLogger, expert_heatmap


@pytest.fixture(autouse=True)
def _restore_wandb_env(monkeypatch):
    # The logger sets WANDB_* for its process; keep them from leaking into later tests.
    for name in ("WANDB_MODE", "WANDB_SILENT", "WANDB_ERROR_REPORTING"):
        monkeypatch.delenv(name, raising=False)


CONFIG = {"train": {"steps": 3, "seq_len": 64}, "model": {"dim": 128}}


def rows():
    base = {"loss": 5.0, "lr": 1e-3, "grad_norm": 1.5, "tokens_per_s": 1000.0, "tokens": 512, "mfu": 0.4,
            "memory_gib": 12.5, "moe/layer1/imbalance": 1.25, "moe/layer3/imbalance": 1.5}
    out = [{**base, "step": s, "loss": 5.0 - s} for s in (1, 2, 3)]
    out[-1]["expert_counts"] = [[10, 20, 30, 40], [25, 25, 25, 25]]  # [MoE layer][expert]
    return out


def read_wandb_file(path: str) -> list:
    """The records of a .wandb file: wandb's leveldb-style log (a 7-byte ':W&B' header, then
    32 KiB blocks of CRC-checked chunks) of wandb.proto Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeros: the writer flushed and padded the block; records go on in the next one
            pos += block - pos % block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos}"
        pending, pos = pending + chunk, pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(records) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            out.setdefault(int(items["_step"]), {}).update(items)
    return out


def settled(pattern: str, steps: list[int], timeout: float = 20.0) -> dict[str, list]:
    """{file: its records} of the .wandb files matching `pattern`, once their history holds
    `steps` (or at the timeout). wandb's service process may still be writing the last records
    when finish() returns: seen on a loaded machine, a file without its history yet."""
    deadline = time.monotonic() + timeout
    while True:
        files = glob.glob(pattern)
        try:
            records = {f: read_wandb_file(f) for f in files}
        except Exception:  # noqa: BLE001 - a record still being written; raised again at the deadline
            if time.monotonic() > deadline:
                raise
            records = {}
        if sorted(s for r in records.values() for s in history(r)) == steps or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def test_offline_run_holds_the_metrics_config_and_heatmap(tmp_path):
    pytest.importorskip("wandb")
    wb = WandbLogger(WandbConfig(mode="offline"), str(tmp_path), CONFIG, is_main=True)
    assert wb.enabled
    for row in rows():
        wb.log(row, row["step"])
    wb.finish()

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert run_dir.endswith(run_id)
    path = os.path.join(run_dir, f"run-{run_id}.wandb")
    records = settled(path, [1, 2, 3])[path]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id and run.project == "herd" and run.display_name == tmp_path.name
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["train"] == CONFIG["train"] and config["model"] == CONFIG["model"]

    steps = history(records)
    assert sorted(steps) == [1, 2, 3]  # herd's step is wandb's step
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gib", "moe/layer1/imbalance"):
        assert key in steps[1], key
    assert steps[2]["loss"] == 3.0
    assert "expert_counts" not in steps[3]  # the table goes in as an image, not a scalar
    assert steps[3]["moe/expert_load/_type"] == "image-file"
    assert "MoE layers 1, 3" in steps[3]["moe/expert_load/caption"]
    assert os.path.exists(os.path.join(run_dir, "files", steps[3]["moe/expert_load/path"]))

    out = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", run_dir], cwd=ROOT, timeout=60,
                         capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0 and "Would sync 1 run" in out.stdout + out.stderr, out.stdout + out.stderr


def test_a_rerun_continues_the_same_wandb_run(tmp_path):
    pytest.importorskip("wandb")
    first = WandbLogger(WandbConfig(), str(tmp_path), CONFIG, is_main=True)
    first.log(rows()[0], 1)
    run_id = first.run.id
    first.finish()
    second = WandbLogger(WandbConfig(), str(tmp_path), CONFIG, is_main=True)
    assert second.run.id == run_id
    second.log(rows()[1], 2)
    second.finish()
    # `wandb sync` of both directories uploads them, in order, as one run.
    records = settled(str(tmp_path / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"), [1, 2])
    steps = {f: sorted(history(r)) for f, r in records.items()}
    files = list(records)
    assert len(files) == 2
    assert sorted(s for f in files for s in steps[f]) == [1, 2], steps


def test_disabled_and_other_ranks_write_nothing(tmp_path):
    for cfg, is_main in ((WandbConfig(mode="disabled"), True), (WandbConfig(mode="offline"), False),
                         (WandbConfig(mode="online"), False)):
        run_dir = tmp_path / f"{cfg.mode}-{is_main}"
        wb = WandbLogger(cfg, str(run_dir), CONFIG, is_main=is_main)
        wb.log(rows()[-1], 3)
        wb.log_expert_heatmap([[1, 2]], 3)
        wb.finish()
        assert not wb.enabled and not run_dir.exists()


def test_without_the_package(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(wandb_log, "wandb_installed", lambda: False)
    with caplog.at_level(logging.WARNING, logger="herd"):
        wb = WandbLogger(WandbConfig(mode="offline"), str(tmp_path), CONFIG, is_main=True)
    assert not wb.enabled and "not installed" in caplog.text
    wb.log(rows()[0], 1)
    assert not any(tmp_path.iterdir())
    # online was asked for explicitly: every rank stops with the fix in the message
    for is_main in (True, False):
        with pytest.raises(ValueError, match=r"pip install 'herd\[wandb\]'"):
            WandbLogger(WandbConfig(mode="online"), str(tmp_path), CONFIG, is_main=is_main)


def test_expert_heatmap_image():
    img = expert_heatmap([[0, 0, 0, 40], [10, 10, 10, 10]], cell=8)
    assert img.size == (4 * 8, 2 * 8) and img.mode == "RGB"
    balanced, idle, hot = img.getpixel((4, 12)), img.getpixel((4, 4)), img.getpixel((28, 4))
    assert idle == (68, 1, 84) and hot == (253, 231, 37)  # the ends of the colour ramp
    assert balanced == (33, 145, 140)  # a balanced layer sits in the middle
    assert expert_heatmap([[1] * 128] * 24).size == (128 * 4, 24 * 4)  # Maverick stays ~512 px wide
    with pytest.raises(ValueError, match="shape"):
        expert_heatmap([1, 2, 3])
