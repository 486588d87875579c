"""Evaluations scored on items whose answer is certain, with the shipped checkpoint: these
fail when the scoring or the memory wiring is broken (a memory row that silently equals
the backbone row, a criterion that passes anything, a label off by one)."""

from __future__ import annotations

import json

import pytest
import torch

from longside.eval import chapterbreak, passkey
from longside.eval.common import encode, score_after_prefix, score_backbone
from longside.loading import load_model

W = 256


@pytest.fixture(scope="module")
def shipped(smollm2):
    return load_model(backbone=smollm2)


@pytest.fixture(scope="module")
def filler(shipped):
    """Real book text (held out) as token ids."""
    from longside.data import load_books

    model, _ = shipped
    book = load_books("test")[0]
    return encode(model.backbone.tokenizer, "\n\n".join(c["text"] for c in book["chapters"][:3]))[:4000]


def test_pass_key_is_read_back_from_memory_and_an_absent_key_fails(shipped, filler):
    model, _ = shipped
    tok = model.backbone.tokenizer
    question = encode(tok, passkey.QUESTIONS["repeat"])
    for key in ("48213", "90577"):
        needle, answer = encode(tok, passkey.NEEDLE.format(key=key)), encode(tok, " " + key)
        with_key = filler[:300] + needle + filler[300:1500] + question  # the key ~1.2k tokens back
        without = filler[:300] + filler[300:1500] + question
        assert score_after_prefix(model, with_key, [answer], window=W)[0].greedy
        assert not score_after_prefix(model, without, [answer], window=W)[0].greedy  # the control
        assert not score_backbone(model.backbone, with_key, [answer], context=W)[0].greedy  # out of its window
        assert not score_after_prefix(model, with_key, [answer], window=W, use_memory=False)[0].greedy


def test_pass_key_run_counts_each_row_right(shipped):
    model, info = shipped
    cfg = passkey.PasskeyConfig(window=W, lengths=(1024,), depths=(0.2,), trials=2, filler="repeat", digits=5,
                                teacher=False)
    res = passkey.run(model, info, cfg)["results"]
    assert res["overall"] == {"longside memory": 1.0, f"backbone@{W}": 0.0}
    assert all(not t["needle_in_window"] for t in res["trials"])


def test_chapterbreak_picks_the_continuation_that_memory_holds(shipped, filler, tmp_path):
    """Each item's true continuation stands verbatim far back in its prefix (in memory, out
    of the window); the memory row must pick it by likelihood on every item."""
    model, info = shipped
    tok = model.backbone.tokenizer
    passages = [filler[a:a + 24] for a in range(2000, 4000, 200)]
    works = {}
    for i in range(3):
        true, negs = passages[i], [p for j, p in enumerate(passages) if j != i][:5]
        # ~1.1k tokens: the scored last 1024 keep the passage, ~800 tokens before the window
        ctx = filler[:300] + true + filler[300 + 50 * i:1100 + 50 * i]
        works[f"w{i}"] = [{"ctx": tok.decode(ctx), "pos": tok.decode(true), "negs": [tok.decode(n) for n in negs]}]
    path = tmp_path / "cb.json"
    path.write_text(json.dumps({"pg19": works}))
    cfg = chapterbreak.ChapterBreakConfig(window=W, prefix_tokens=(1024,), candidate_tokens=24,
                                          rows=("local", "memory"))
    res = chapterbreak.run(model, info, cfg, data=str(path))["results"]
    rows = res["by_prefix_tokens"]["1024"]["rows"]
    assert rows["longside memory"]["likelihood"]["correct"] == 3
    assert rows[f"backbone@{W}"]["likelihood"]["correct"] < 3  # it cannot see the answer
    labels = [it["label"] for it in res["items"]]
    assert [it["predicted"]["longside memory"]["1024"]["likelihood"] for it in res["items"]] == labels


def test_memory_row_differs_from_the_backbone_row(shipped, filler):
    model, _ = shipped
    prefix, cands = filler[:1500], [filler[1500:1510], filler[2500:2510]]
    ls = score_after_prefix(model, prefix, cands, window=W)
    bb = score_backbone(model.backbone, prefix, cands, context=W)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(ls, bb)) > 0.05
    torch.testing.assert_close(torch.tensor([c.logprob for c in ls]), torch.tensor([c.logprob for c in ls]))


def test_icl_answers_test_sentences_whose_labelled_copy_is_in_memory(shipped, filler, tmp_path):
    """Arbitrary labels (no sentiment to learn), every test sentence also a labelled
    demonstration: the memory row must answer all of them; the backbone, which sees only
    two demonstrations, cannot."""
    import datasets

    from longside.eval import icl

    model, info = shipped
    tok = model.backbone.tokenizer
    sentences = [tok.decode(filler[a:a + 12]).strip() for a in range(0, 2400, 40)][:60]
    rng = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (len(sentences),), generator=rng).tolist()
    rows = [{"text": t, "label": y, "label_text": ("alpha", "beta")[y]} for t, y in zip(sentences, labels)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                               "test": datasets.Dataset.from_list(rows[10:16])})
    dd.save_to_disk(str(tmp_path / "arbitrary"))
    cfg = icl.IclConfig(window=W, k_window=2, n_memory=len(rows) - 2, n_test=6, seeds=1, max_text_tokens=16)
    res = icl.run(model, info, cfg, data=str(tmp_path / "arbitrary"))["results"]
    acc = {r: v["label"]["mean"] for r, v in res["tasks"]["arbitrary"]["rows"].items()}
    assert acc["longside memory"] == 1.0, acc
    assert acc["backbone k-shot"] < 1.0 and acc["longside memory off"] < 1.0, acc
