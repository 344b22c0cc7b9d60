"""launch/eval_long.py: the scoring is not vacuous (a model that finds the pass key scores 1, one
that answers a position late or from another document scores 0), and the script runs end to end
on the checkpoints of a two-phase passkey run, with errors that name the bad value."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, compose

sys.path.insert(0, os.path.join(ROOT, "launch"))

import eval_long

from data.passkey import KEY_INTRO, QUESTION, Filler

VOCAB = 4352
ASK = list(QUESTION.encode())


def copier(shift: int = 0, last_wrong: bool = False):
    """logits_of for a model that reads the pass key from the hidden sentence of each row (only
    tokens before the position it predicts) and emits its digits after the question: at the
    right positions (shift 0), a position late (shift 1), or with the last digit wrong."""
    def logits_of(batch):
        tokens = batch["tokens"]
        B, T = tokens.shape
        logits = torch.zeros(B, T, VOCAB)
        for b, row in enumerate(tokens.tolist()):
            key = bytes(t for t in row if t < 256).decode().split(KEY_INTRO)[1].split(".")[0]
            if last_wrong:
                key = key[:-1] + str((int(key[-1]) + 1) % 10)
            for t in range(T):
                for k in range(len(key)):  # the row so far ends with the question and k digits
                    end = t + 1 - shift
                    if row[end - len(ASK) - k: end - k] == ASK and all(48 <= c < 58 for c in row[end - k: end]):
                        logits[b, t, ord(key[k])] = 1.0
        return logits
    return logits_of


def test_scoring_is_not_vacuous():
    filler = Filler("repeat", None, 512)
    docs = eval_long.build_documents([256, 512], [0.1, 0.9], 3, 0, 5, filler, VOCAB)
    again = eval_long.build_documents([512], [0.9], 3, 0, 5, filler, VOCAB)
    assert [d.key for d in docs[512][1]] == [d.key for d in again[512][0]]  # a cell's documents do not depend on the grid
    assert len({d.key for cells in docs.values() for cell in cells for d in cell}) > 6
    right = eval_long.evaluate(copier(), docs, 1024, log=lambda _: None)
    assert right["accuracy"] == {256: [1.0, 1.0], 512: [1.0, 1.0]}
    for wrong in (copier(shift=1), copier(last_wrong=True)):
        scores = eval_long.evaluate(wrong, docs, 1024, log=lambda _: None)
        assert all(a == 0.0 for cell in scores["accuracy"].values() for a in cell)
    exact, digits = eval_long.score(copier(last_wrong=True), docs[256][0], 2)
    assert not exact.any() and (digits == 4).all()


def test_end_to_end_on_a_two_phase_run(tmp_path, capsys):
    from train.loop import train

    run = tmp_path / "run"
    train(compose(["+model=tiny", "data.kind=passkey", "data.passkey_digits=3", "train.batch_size=1",
                   "train.steps=2", "checkpoint.interval=1", f"run.dir={run}", "logging.wandb.mode=disabled",
                   "phases=[{name: short, steps: 1, seq_len: 128}, {name: long, seq_len: 256}]"]))
    out = tmp_path / "eval" / "cmp"
    eval_long.main(["--checkpoint", str(run), "--steps", "1,2", "--lengths", "128,256", "--depths", "0.2,0.8",
                    "--trials", "2", "--out", str(out)])
    report = json.loads((tmp_path / "eval" / "cmp.json").read_text())
    assert report["digits"] == 3 and report["lengths"] == [128, 256] and report["depths"] == [0.2, 0.8]
    first, second = report["checkpoints"]
    assert (first["label"], first["seq_len"]) == ("step 1, end of short", 128)
    assert (second["label"], second["seq_len"]) == ("step 2, end of long", 256)
    for r in report["checkpoints"]:
        assert set(r["accuracy"]) == {"128", "256"} and all(len(v) == 2 for v in r["accuracy"].values())
        assert all(0 <= a <= 1 for v in r["accuracy"].values() for a in v)
    printed = capsys.readouterr().out
    assert "length    256: accuracy" in printed and "left for this checkpoint" in printed
    pytest.importorskip("matplotlib")
    assert (tmp_path / "eval" / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_saved_random_model_and_errors(tmp_path):
    from model import ModelArgs, Transformer
    from train.checkpoint import save_weights

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, vocab_size=VOCAB,
                                  max_seq_len=512, ffn_hidden=128, n_experts=2, expert_hidden=64,
                                  attention_chunk_size=64, nope_layer_interval=2))
    model.init_weights()
    save_weights(model, str(tmp_path / "weights"))
    report = eval_long.run(eval_long.main_parser().parse_args(
        ["--checkpoint", str(tmp_path / "weights"), "--lengths", "256,512", "--trials", "2", "--depths", "0.5",
         "--out", str(tmp_path / "random")]))
    assert report["checkpoints"][0]["label"] == "weights (weights)"
    assert np.mean(report["checkpoints"][0]["accuracy"]["512"]) < 0.5  # a random model does not find 5 digits
    assert (tmp_path / "random.json").exists()

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            eval_long.main(list(argv))
        return str(e.value)

    w = str(tmp_path / "weights")
    assert "--lengths 1024 exceeds model.max_seq_len=512" in error("--checkpoint", w, "--lengths", "256,1024")
    assert "shorter than a passkey document" in error("--checkpoint", w, "--lengths", "64")
    assert "no such directory" in error("--checkpoint", str(tmp_path / "nope"))
    assert "holds no checkpoints" in error("--checkpoint", str(tmp_path))
    assert "--steps picks checkpoints of a run directory" in error("--checkpoint", w, "--steps", "3")
    assert "must be in [0, 1]" in error("--checkpoint", w, "--depths", "0.5,1.5")
    assert "comma-separated numbers" in error("--checkpoint", w, "--lengths", "2k")
