"""train/checkpoint.py against damaged and crafted checkpoints: every test writes a real checkpoint
with the Checkpointer, then injects the fault (a pickle that runs a command, a flipped byte, a
truncated file, broken JSON) and checks that loading refuses it, naming the file, and runs nothing."""
import json
import operator
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT
from train.checkpoint import Checkpointer, export_to_hf, load_checkpoint
from train.integrity import TRAIN_STATE, CheckpointError, digest_files, read_metadata

from .test_checkpoint import ARGS, setup, take_steps


class RunCommand:
    """Unpickles by running a shell command (what a crafted checkpoint does)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class Disguised:
    """Unpickles by running the command, then yields `value`: the load still succeeds."""

    def __init__(self, value, command):
        self.value, self.command = value, command

    def __reduce__(self):
        return operator.itemgetter(1), ((RunCommand(self.command), self.value),)

    def __deepcopy__(self, memo):  # the optimizer's state_dict copies param_groups
        return self


def saved(run_dir, steps=(2,), keep=3):
    model, opt, state = setup()
    ck = Checkpointer(str(run_dir), keep=keep, rank=0)
    for step in steps:
        take_steps(model, opt, state, step - state.step)
        ck.save(step, model, opt, state)
    return ck.last_saved, model


def reseal(ckpt):
    """Recompute the manifest and train_state.json's checksum: a crafted checkpoint whose author
    also rewrote the manifest (the checksums guard against damage, not against an author)."""
    from train.integrity import write_record

    path = os.path.join(ckpt, TRAIN_STATE)
    record = json.load(open(path))
    if "manifest" not in record:  # a checkpoint from before manifests: nothing to reseal
        return
    files = record["manifest"]["files"]
    files.update(digest_files([os.path.join(ckpt, f) for f in files]))
    record.pop("checksum")
    write_record(path, record)


def craft_metadata(ckpt, marker):
    """Replace .metadata by one that creates `marker` when unpickled and still yields the real metadata."""
    real = pickle.load(open(os.path.join(ckpt, ".metadata"), "rb"))
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(Disguised(real, f"touch {marker}"), f)
    reseal(ckpt)


def flip_byte(file, offset):
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def tensor_offset(ckpt, fqn_part):
    """Where in its file the DCP item whose name contains `fqn_part` starts."""
    md = read_metadata(ckpt)
    for index, info in md.storage_data.items():
        if fqn_part in index.fqn:
            return os.path.join(ckpt, info.relative_path), info.offset, info.length
    raise KeyError(fqn_part)


def fresh():
    model, opt, state = setup(seed=1)
    return model, opt, state, {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- nothing runs


def test_crafted_metadata_is_refused_and_runs_nothing(tmp_path):
    ckpt, _ = saved(tmp_path)
    marker = tmp_path / "pwned"
    craft_metadata(ckpt, marker)
    model, opt, state, before = fresh()
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt}/.metadata asks to build operator.itemgetter")):
        load_checkpoint(ckpt, model, opt, state)
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt}/.metadata")):
        export_to_hf(ckpt, str(tmp_path / "hf"))
    assert not marker.exists() and unchanged(model, before) and not (tmp_path / "hf").exists()


def test_crafted_metadata_through_the_converter(tmp_path):
    """The command a user types: one line naming the file, nothing created."""
    ckpt, _ = saved(tmp_path / "run")
    (tmp_path / "run/config.yaml").write_text(json.dumps({"model": ARGS}))  # the model config (YAML)
    marker = tmp_path / "pwned"
    craft_metadata(ckpt, marker)
    out = subprocess.run([sys.executable, "launch/convert_hf.py", "to-hf", ckpt, str(tmp_path / "hf")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and not marker.exists() and not (tmp_path / "hf").exists()
    assert out.stderr.startswith(f"error: {ckpt}/.metadata asks to build operator.itemgetter"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_crafted_optimizer_bytes_are_refused_and_run_nothing(tmp_path):
    """DCP stores the optimizer's param_groups as pickled byte items inside the shards."""
    marker = tmp_path / "pwned"
    model, opt, state = setup()
    take_steps(model, opt, state, 1)  # the optimizer state exists: saving takes no step that computes with it
    opt.param_groups[0]["weight_decay"] = Disguised(0.1, f"touch {marker}")
    ck = Checkpointer(str(tmp_path), keep=1, rank=0)
    ck.save(1, model, opt, state)
    assert not marker.exists()
    model, opt, state, before = fresh()
    with pytest.raises(CheckpointError, match=re.escape(f"{ck.last_saved}/__0_0.distcp could not be read")):
        load_checkpoint(ck.last_saved, model, opt, state)
    assert not marker.exists()


# ---------------------------------------------------------------- damage is named


def test_flipped_byte_in_a_shard_is_caught_before_anything_loads(tmp_path):
    ckpt, _ = saved(tmp_path)
    file, offset, length = tensor_offset(ckpt, "exp_avg_sq")  # optimizer state: it used to load silently
    flip_byte(file, offset + length // 2)
    model, opt, state, before = fresh()
    with pytest.raises(CheckpointError, match=re.escape(f"{file} does not match its checksum")):
        load_checkpoint(ckpt, model, opt, state)
    assert unchanged(model, before) and state.step == 0


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", TRAIN_STATE, "rank-00000.json"])
def test_truncated_file_is_named(tmp_path, name):
    ckpt, _ = saved(tmp_path)
    file = os.path.join(ckpt, name)
    os.truncate(file, os.path.getsize(file) // 2)
    model, opt, state, before = fresh()
    with pytest.raises(CheckpointError, match=re.escape(file)) as e:
        load_checkpoint(ckpt, model, opt, state)
    assert not isinstance(e.value, json.JSONDecodeError) and "restore the file from a copy" in str(e.value)
    assert unchanged(model, before)


@pytest.mark.parametrize("name,manifest,error", [(TRAIN_STATE, True, "is not valid JSON"),
                                                  ("rank-00000.json", True, "does not match its checksum"),
                                                  ("rank-00000.json", False, "is not valid JSON")])
def test_corrupt_json_is_named(tmp_path, name, manifest, error):
    ckpt, _ = saved(tmp_path)
    if not manifest:
        strip_manifest(ckpt)
    file = os.path.join(ckpt, name)
    with open(file, "r+b") as f:
        f.write(b"\x00")
    with pytest.raises(CheckpointError, match=re.escape(f"{file} {error}")):
        load_checkpoint(ckpt, *setup(seed=1))


def test_a_changed_digit_in_train_state_is_caught(tmp_path):
    ckpt, _ = saved(tmp_path, steps=(2,))
    file = os.path.join(ckpt, TRAIN_STATE)
    text = open(file).read()
    open(file, "w").write(text.replace('"step": 2', '"step": 7'))
    with pytest.raises(CheckpointError, match=re.escape(f"{file} does not match its own checksum")):
        load_checkpoint(ckpt, *setup(seed=1))


def strip_manifest(ckpt):
    """What herd wrote before it kept manifests."""
    path = os.path.join(ckpt, TRAIN_STATE)
    record = json.load(open(path))
    json.dump({k: v for k, v in record.items() if k not in ("manifest", "sequence", "checksum")}, open(path, "w"))


def test_checkpoint_without_manifest_loads_with_one_warning(tmp_path, caplog):
    ckpt, model = saved(tmp_path)
    strip_manifest(ckpt)
    fresh_model, opt, state, _ = fresh()
    with caplog.at_level("WARNING", logger="herd"):
        load_checkpoint(ckpt, fresh_model, opt, state)
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        f"{ckpt} has no manifest (written before herd kept checksums): its files are checked for size and format "
        "only, not for flipped bytes"]
    assert unchanged(fresh_model, model.state_dict()) and state.step == 2
    # ... and a truncated shard is still named, from the sizes the metadata reads
    file = os.path.join(ckpt, "__0_0.distcp")
    os.truncate(file, os.path.getsize(file) - 1)
    with pytest.raises(CheckpointError, match=re.escape(f"{file} is {os.path.getsize(file)} bytes, but the")):
        load_checkpoint(ckpt, *setup(seed=1))


def test_weights_only_checkpoint_has_a_manifest(tmp_path):
    from model import ModelArgs, Transformer
    from train.checkpoint import save_weights

    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS))
    model.init_weights()
    save_weights(model, str(tmp_path / "w"))
    back = Transformer(ModelArgs(**ARGS))
    load_checkpoint(str(tmp_path / "w"), back)
    assert unchanged(back, model.state_dict())
    flip_byte(tmp_path / "w/__0_0.distcp", 100)
    with pytest.raises(CheckpointError, match="__0_0.distcp does not match its checksum"):
        load_checkpoint(str(tmp_path / "w"), back)


# ---------------------------------------------------------------- durable


def test_save_fsyncs_the_json_files_and_the_directories(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ckpt, _ = saved(tmp_path, steps=(3,))
    tmp = ckpt + ".tmp"
    for path in (f"{tmp}/rank-00000.json", f"{tmp}/{TRAIN_STATE}", tmp, str(tmp_path / "checkpoints")):
        assert path in synced, path
    assert synced.index(tmp) > synced.index(f"{tmp}/{TRAIN_STATE}")  # the directory after its last file
