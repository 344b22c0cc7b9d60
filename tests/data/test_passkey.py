"""The passkey source (data/passkey.py): deterministic rows, the pass key where the labels say it
is, N ranks see what one process sees, an exact resume, and errors that name the bad value."""
import numpy as np
import pytest
import torch

from data.args import DataArgs
from data.passkey import KEY_MARK, QUESTION, Filler, PasskeyBatches, make_document, min_document_length
from data.specials import special_token_id

VOCAB = 4352


def text_of(tokens) -> str:
    return bytes(t for t in tokens.tolist() if 0 <= t < 256).decode("utf-8", errors="replace")


def test_rows_are_deterministic_and_packed_like_other_sources():
    a, b = PasskeyBatches(None, 512, 4, VOCAB, seed=7), PasskeyBatches(None, 512, 4, VOCAB, seed=7)
    other = PasskeyBatches(None, 512, 4, VOCAB, seed=8)
    x, y, z = next(a), next(b), next(other)
    assert all(torch.equal(x[k], y[k]) for k in x) and not torch.equal(x["tokens"], z["tokens"])
    assert set(x) == {"tokens", "labels", "positions", "doc_ids"} and x["tokens"].shape == (4, 512)
    bos, eos = special_token_id("begin_of_text", VOCAB), special_token_id("end_of_text", VOCAB)
    lengths = []
    for r in range(4):
        doc_ids, positions = x["doc_ids"][r], x["positions"][r]
        for d in doc_ids.unique().tolist():
            where = (doc_ids == d).nonzero().flatten()
            if d == -1:  # padding: after the documents, no targets
                assert where.min() > (doc_ids >= 0).nonzero().max() and (x["labels"][r, where] == -100).all()
                continue
            assert torch.equal(positions[where], torch.arange(len(where)))  # positions restart per document
            tokens, labels = x["tokens"][r, where], x["labels"][r, where]
            assert tokens[0] == bos and tokens[-1] == eos and labels[-1] == -100
            assert torch.equal(labels[:-1], tokens[1:])  # the next token within the document, never across
            lengths.append(len(where))
    assert min(lengths) >= min_document_length(5) and max(lengths) <= 512


def test_the_pass_key_is_where_the_labels_say():
    data = PasskeyBatches(None, 1024, 1, VOCAB, seed=3, digits=6)
    for index in range(6):
        for doc in data.documents_of_row(index):
            key = doc.key
            assert len(key) == 6 and key.isdigit()
            text = text_of(doc.tokens)
            assert text.count(key) == 3 and text.endswith(QUESTION + key + ".")  # hidden twice, answered once
            answer = doc.targets[doc.answer_start - 1: doc.answer_start + 5]  # the labels that predict the answer
            assert bytes(answer.astype(np.uint8)).decode() == key
            assert bytes(doc.tokens[doc.key_start: doc.key_start + 6].astype(np.uint8)).decode() == key
            prompt = text_of(doc.tokens[: doc.answer_start])
            assert prompt.endswith(QUESTION) and key in prompt  # the answer is findable in what precedes it
    # depth puts the hidden sentence where it is asked for (within one filler sentence)
    filler = Filler("repeat", None, 4096)
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        doc = make_document(np.random.default_rng(0), 4096, depth, 5, filler, VOCAB)
        share = (doc.key_start - 1) / (4096 - min_document_length(5))
        assert abs(share - depth) < 0.01
    assert any(len(data.documents_of_row(i)) == 2 for i in range(20))  # short documents share a row


def test_key_loss_scores_only_what_retrieval_predicts(tmp_path):
    """passkey_loss=key: the labels are the key's digits at its repeat and at the answer, nothing
    else; the marker byte before the key is in no filler, text filler included."""
    digits = 3
    full = PasskeyBatches(None, 512, 2, VOCAB, seed=4, digits=digits)
    keyed = PasskeyBatches(None, 512, 2, VOCAB, seed=4, digits=digits, loss="key")
    x, y = next(full), next(keyed)
    assert torch.equal(x["tokens"], y["tokens"])
    for r in range(2):
        docs = full.documents_of_row(r)
        scored = (y["labels"][r] != -100).nonzero().flatten()
        assert len(scored) == 2 * digits * len(docs)
        assert torch.equal(y["labels"][r, scored], x["labels"][r, scored])  # the same targets where scored
        assert all(chr(c).isdigit() for c in y["labels"][r, scored].tolist())  # digits, predicted from
        assert all(c == ord(KEY_MARK) or chr(c).isdigit() for c in y["tokens"][r, scored].tolist())  # # or a digit
        for doc in docs:  # each scored digit follows the marker within the key's length
            for start in (doc.repeat_start, doc.answer_start):
                assert doc.tokens[start - 1] == ord(KEY_MARK)
                assert bytes(doc.tokens[start: start + digits].astype(np.uint8)).decode() == doc.key
    (tmp_path / "text.txt").write_text("Comments # like this one. " * 200)
    for kind, path in (("repeat", None), ("text", str(tmp_path / "text.txt")), ("text", None)):
        assert KEY_MARK.encode() not in Filler(kind, path, 256).text
    with pytest.raises(ValueError, match="data.passkey_loss='answer'"):
        DataArgs(kind="passkey", passkey_loss="answer").validate()


def test_ranks_partition_the_global_batch():
    one = PasskeyBatches(None, 256, 4, VOCAB, seed=2)
    ranks = [PasskeyBatches(None, 256, 2, VOCAB, rank=r, world_size=2, seed=2) for r in range(2)]
    for _ in range(3):
        whole, parts = next(one), [next(r) for r in ranks]
        for k in whole:
            assert torch.equal(whole[k], torch.cat([p[k] for p in parts]))


def test_state_resumes_the_same_batches_and_refuses_other_rows():
    a = PasskeyBatches(None, 256, 4, VOCAB, seed=1, filler="text")
    for _ in range(3):
        next(a)
    saved = a.state_dict()
    b = PasskeyBatches(None, 256, 2, VOCAB, rank=1, world_size=2, seed=1, filler="text")  # another layout
    b.load_state_dict(saved)
    assert torch.equal(next(a)["tokens"][2:], next(b)["tokens"])
    with pytest.raises(ValueError, match="seq_len=256, this one 512"):
        PasskeyBatches(None, 512, 4, VOCAB, seed=1).load_state_dict(saved)


def test_bad_values_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"train.seq_len=64 is too short .* lower data.passkey_digits"):
        PasskeyBatches(None, 64, 2, VOCAB)
    with pytest.raises(ValueError, match="data.passkey_digits=0"):
        PasskeyBatches(None, 256, 2, VOCAB, digits=0)
    with pytest.raises(ValueError, match="data.passkey_filler='lorem'"):
        PasskeyBatches(None, 256, 2, VOCAB, filler="lorem")
    with pytest.raises(FileNotFoundError, match="data.path"):
        PasskeyBatches(str(tmp_path / "missing.txt"), 256, 2, VOCAB, filler="text")
    (tmp_path / "short.txt").write_text("Too short. Much too short.")
    with pytest.raises(ValueError, match="too little filler"):
        PasskeyBatches(str(tmp_path / "short.txt"), 256, 2, VOCAB, filler="text")
    with pytest.raises(ValueError, match="data.kind='passkeys' is not one of shards, text, passkey"):
        DataArgs(kind="passkeys").validate()
    with pytest.raises(ValueError, match="data.passkey_filler='x'"):
        DataArgs(kind="passkey", passkey_filler="x").validate()
