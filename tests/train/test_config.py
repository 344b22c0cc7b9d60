"""The config schema, in process: every group has one schema, a typo or a bad value is an error
that names it before anything is built, and the data group takes mixtures from the command line
and from a file."""
import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from tests.helpers import ROOT, compose, run_ranks


@pytest.fixture
def trainer_error(tmp_path, monkeypatch):
    """The error Trainer(cfg) stops with; building a model first fails the test."""
    import train.loop

    def no_model(*a, **k):
        raise AssertionError("the model was built before the config error was found")

    monkeypatch.setattr(train.loop, "build_parallel_model", no_model)

    def error(overrides):
        cfg = compose(["+model=tiny", f"run.dir={tmp_path}", "logging.wandb.mode=disabled", *overrides])
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            train.loop.Trainer(cfg)
        assert not (tmp_path / "metrics.jsonl").exists()
        return str(e.value)

    return error


@pytest.mark.parametrize("override,expected", [
    ("model.n_kv_heads=3", "n_kv_heads=3"),
    ("model.top_k=9", "top_k=9"),
    ("parallel.ep=3", "parallel.ep=3"),
    ("train.seq_len=8192", "train.seq_len=8192"),
    ("train.dtype=float8", "train.dtype='float8'"),
    ("logging.wandb.mode=sometimes", "sometimes"),
    ("data.kind=video", "data.kind='video'"),
    ("data.epochs=0", "data.epochs=0"),
    ("data.num_workers=-1", "data.num_workers=-1"),
    ("+data.sources=[{urls: sample, weight: 0}]", "weight=0"),
    ("checkpoint.keep=0", "checkpoint.keep=0"),
    ("optim.weight_decay=-5", "optim.weight_decay=-5"),
    ("optim.eps=0", "optim.eps=0"),
    ("parallel.timeout_s=0", "parallel.timeout_s=0"),
    ("parallel.dp_replicate=0", "parallel.dp_replicate=0"),
])
def test_bad_value_stops_before_the_model_is_built(trainer_error, override, expected):
    assert expected in trainer_error([override])


@pytest.mark.parametrize("override,expected", [("train.stepz=5", "stepz"), ("model.dimm=5", "dimm"),
                                               ("model.vision.dimm=5", "dimm"), ("data.urlz=x", "urlz"),
                                               ("model.dim=wide", "model.dim")])
def test_unknown_key_or_wrong_type_is_a_composition_error(override, expected):
    with pytest.raises(ConfigCompositionException) as e:
        compose(["+model=tiny", override])
    assert expected in str(e.value) + str(e.value.__cause__)


def _choices(overrides) -> set[str]:
    with pytest.raises(MissingConfigException) as e:
        compose(overrides)
    listed = str(e.value).split("Available options in")[1].split("Config search path")[0]
    return {line.strip() for line in listed.splitlines()[1:] if line.strip()}


def test_hydra_lists_only_real_choices():
    assert _choices(["+model=gigantic"]) == {"tiny", "scout", "maverick", "behemoth", "scout_proxy", "maverick_proxy",
                                             "behemoth_proxy"}
    assert _choices(["+model=tiny", "data=nothing"]) == {"sample", "text", "mixture"}


def test_missing_shard_directory_fails_fast(trainer_error, tmp_path):
    assert "nowhere" in trainer_error([f"data.urls={tmp_path}/nowhere"])
    (tmp_path / "empty").mkdir()
    assert "holds no" in trainer_error([f"data.urls={tmp_path}/empty"])


def test_tokenizer_patch_id_must_match_the_model(trainer_error):
    message = trainer_error(["model.patch_token_id=4000"])
    assert "4188" in message and "model.patch_token_id=4000" in message


def test_dtypes_are_spelled_one_way_and_aliases_still_work():
    from train.config import validate

    cfg = compose(["+model=tiny", "train.dtype=bf16", "parallel.param_dtype=float32", "data.image_dtype=bf16"])
    validate(cfg)
    assert (cfg.train.dtype, cfg.parallel.param_dtype, cfg.data.image_dtype) == ("bfloat16", "float32", "bfloat16")


def test_data_group_is_the_data_packages_schema():
    """data.sources and data.epochs, which docs/data.md documents, are real keys; a mixture comes
    from the command line or from configs/data/mixture.yaml, and becomes DataArgs sources."""
    from data.args import DataArgs, Source
    from train.config import data_args

    args = data_args(compose(["+model=tiny", "data.epochs=2", "data.sources=[{urls: /d/a, weight: 3}, {urls: /d/b}]"]))
    assert isinstance(args, DataArgs) and args.epochs == 2
    assert args.resolved_sources() == [Source("/d/a", 3.0), Source("/d/b", 1.0)]
    mixture = data_args(compose(["+model=tiny", "data=mixture"]))
    assert [s.weight for s in mixture.resolved_sources()] == [3.0, 1.0]
    assert data_args(compose(["+model=tiny"])).resolved_sources() == [Source("sample", 1.0)]
    with pytest.raises(ValueError, match="not both"):
        data_args(compose(["+model=tiny", "data.urls=/d/a", "data.sources=[{urls: /d/b}]"]))
    with pytest.raises(ConfigCompositionException):
        compose(["+model=tiny", "data.sources=[{urlz: /d/b}]"])


def test_cli_reports_config_errors_in_one_line(tmp_path):
    """Through the real entry point: a Hydra error, a value error and a missing preset each stop
    with a message and no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args, expected in ((["+model=tiny", "train.stepz=5"], "stepz"),
                           (["+model=tiny", "model.top_k=9"], "error: model config: top_k=9"),
                           ([], "choose a model preset: launch/pretrain.py +model=tiny")):
        out = subprocess.run([sys.executable, "launch/pretrain.py", *args, f"run.dir={tmp_path}/run"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and expected in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_plan_help_and_errors(capsys):
    """launch/plan.py's main() is the whole command: --help is argparse's, errors are one line."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    from plan import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "+model=NAME" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="dimm"):
        main(["+model=tiny", "model.dimm=1"])
    with pytest.raises(SystemExit, match="choose a model preset"):
        main([])


def _start_with(overrides_by_rank):
    import os

    from train.loop import Trainer

    try:
        Trainer(compose(overrides_by_rank[int(os.environ["RANK"])]))
    except ValueError as e:
        return str(e)
    return None


def test_ranks_started_with_different_configs_are_named(tmp_path):
    common = ["+model=tiny", "data=text", f"run.dir={tmp_path}", "logging.wandb.mode=disabled"]
    errors = run_ranks(_start_with, 2, [common + ["optim.lr=1e-3"], common + ["optim.lr=3e-4"]])
    assert errors[0] == errors[1] and "different config: ranks [0]; ranks [1]" in errors[0]
    assert run_ranks(_start_with, 2, [common, common]) == [None, None]  # the same config starts
