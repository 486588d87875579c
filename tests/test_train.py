import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from longside.training.config import preset
from longside.training.data import DocumentStream, RowCursor, tokenized_books
from longside.training.train import lr_at, train


def test_schedule_warms_up_then_decays():
    cfg = preset("tiny", max_steps=20, warmup_steps=4)
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs[0] < lrs[3] == 1.0 and lrs[4] > lrs[10] > lrs[19] >= cfg.min_lr_ratio


def test_documents_are_deterministic_and_scored_correctly(smollm2):
    cfg = preset("tiny", synthetic_share=0.5)
    stream = DocumentStream(tokenized_books(smollm2, "train"), cfg, smollm2.tokenizer)
    kinds = set()
    for i in range(12):
        ids, labels = stream.document(i)
        again = stream.document(i)
        assert np.array_equal(ids, again[0]) and np.array_equal(labels, again[1])
        assert len(ids) % cfg.segment == 0 and len(ids) >= 2 * cfg.segment
        synthetic = (labels == -100).any()
        kinds.add(bool(synthetic))
        if synthetic:  # only the answer is scored, and the key appears earlier, outside the last segment
            answer = smollm2.tokenizer.decode(ids[labels != -100]).strip(" .")
            assert answer.isdigit()
            head = smollm2.tokenizer.decode(ids[: -cfg.segment])
            assert f"pass key is {answer}" in head
    assert kinds == {True, False}


def test_later_epochs_read_the_next_stretch_of_each_book(smollm2):
    cfg = preset("tiny", synthetic_share=0.0)
    stream = DocumentStream(tokenized_books(smollm2, "train"), cfg, smollm2.tokenizer)
    n, span = len(stream.books), cfg.max_book_segments * cfg.segment
    by_epoch = [[stream.document(i)[0] for i in range(e * n, (e + 1) * n)] for e in range(3)]
    assert all(len(d) == span for docs in by_epoch for d in docs)  # every book here holds one document

    stretches = {}  # every whole stretch a book has (and its tail), by content: (book index, offset)
    for b, book in enumerate(stream.books):
        for s in [*range(0, len(book) - span + 1, span), len(book) - span]:
            stretches.setdefault(book[s:s + span].tobytes(), (b, s))

    def source(doc):  # (book index, offset) of a document
        assert doc.astype(np.int32).tobytes() in stretches, "a document is not a stretch of a training book"
        return stretches[doc.astype(np.int32).tobytes()]

    for e, docs in enumerate(by_epoch):
        where = dict(source(d) for d in docs)
        assert sorted(where) == list(range(n))  # each book once per epoch
        for b, start in where.items():
            book = stream.books[b]
            if len(book) >= (e + 1) * span:  # the e-th stretch, whole
                assert start == e * span
            elif len(book) <= span:  # a book of one document reads the same text every epoch
                assert start == 0
    assert sum(len(b) >= 2 * span for b in stream.books) > n // 2  # the rule was exercised


def test_rows_stream_whole_documents_and_reset_at_boundaries(smollm2):
    cfg = preset("tiny", batch_size=2)
    stream = DocumentStream(tokenized_books(smollm2, "train"), cfg, smollm2.tokenizer)
    cursor = RowCursor(stream, 2)
    seen = {0: [], 1: []}
    for _ in range(12):
        ids, _, fresh = cursor.next_batch()
        for r in range(2):
            seen[r].append((r in fresh, ids[r]))
    for r in range(2):
        doc = stream.document(r)[0]
        n = len(doc) // cfg.segment
        assert seen[r][0][0]  # the first segment of a document resets that row's memory
        assert all(not fresh for fresh, _ in seen[r][1:n])
        assert torch.equal(torch.cat([s for _, s in seen[r][:n]]), torch.from_numpy(doc))


def test_resume_is_exact(tmp_path, smollm2):
    full = preset("tiny", max_steps=4, save_every=2, eval_every=100, out=str(tmp_path / "full"))
    train(full, backbone=smollm2, progress=False)
    half = preset("tiny", max_steps=2, save_every=2, eval_every=100, out=str(tmp_path / "half"))
    train(half, backbone=smollm2, progress=False)
    rest = preset("tiny", max_steps=4, save_every=2, eval_every=100, out=str(tmp_path / "half"))
    train(rest, resume=tmp_path / "half", backbone=smollm2, progress=False)
    a = load_file(str(tmp_path / "full" / "model" / "side_model.safetensors"))
    b = load_file(str(tmp_path / "half" / "model" / "side_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist = json.loads((tmp_path / "half" / "history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2, 3, 4]


def test_loss_falls_on_real_text(smollm2):
    """A few steps on one real segment: the side network learns (from the backbone's loss)."""
    from longside.config import SideNetConfig
    from longside.model import LongSideModel

    torch.manual_seed(0)
    model = LongSideModel(smollm2, SideNetConfig(window=64, capacity_tokens=1024))
    ids = torch.from_numpy(tokenized_books(smollm2, "train")[0][:64].astype(np.int64))[None]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids, use_memory=False, write_memory=False, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_token_cache_in_loss_chooses_what_the_loss_scores(smollm2):
    """False scores the side network's own output: the loss a reader with the token cache
    left out gets. With memory holding the same text the two losses differ (the copy read)."""
    from longside.config import SideNetConfig
    from longside.model import LongSideModel
    from longside.training.config import TrainConfig
    from longside.training.train import segment_loss

    torch.manual_seed(0)
    model = LongSideModel(smollm2, SideNetConfig(window=64, capacity_tokens=1024))
    ids = torch.from_numpy(tokenized_books(smollm2, "train")[0][:64].astype(np.int64))[None]
    got, want = {}, {}
    for in_loss in (True, False):
        cfg = TrainConfig(segment=64, side=model.config, token_cache_in_loss=in_loss)
        with torch.no_grad():
            model.reset_memory()
            model(ids, use_memory=True, write_memory=True, return_logits=False)
            want[in_loss] = model(ids, labels=ids, write_memory=False, return_logits=False,
                                  token_cache=in_loss).loss.item()
            got[in_loss] = segment_loss(model, ids, ids, cfg, None)[0].item()
    assert got == pytest.approx(want, rel=1e-5)
    assert want[True] < want[False] - 0.5  # the text is in memory: the cache's copy read names it


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path, smollm2):
    cfg = preset("tiny", out=str(tmp_path / "run"))
    result = train(cfg, backbone=smollm2, progress=False)
    assert result["step"] == cfg.max_steps and np.isfinite(result["loss"])
    assert result["ppl_memory"] > 1 and result["ppl_no_memory"] > 1


class _Marker:
    """Unpickling this runs `open(path, "w")`: what a crafted train_state.pt could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_never_unpickles(tmp_path, smollm2):
    """A training directory holding a pickle (the old format, or a crafted one) is refused
    before anything is read from it; the pickle never runs."""
    import pickle

    from longside.errors import CheckpointError

    marker = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_state.pt").write_bytes(pickle.dumps(_Marker(str(marker))))
    cfg = preset("tiny", out=str(tmp_path / "out"), max_steps=1)
    with pytest.raises(CheckpointError, match="pickle"):
        train(cfg, resume=run, backbone=smollm2, progress=False)
    assert not marker.exists()
