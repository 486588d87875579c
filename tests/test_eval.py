"""The evaluations, each run small on real data with the real SmolLM2.

A side network with a 128-token window keeps every run to a few dozen short forwards.
Tests check that reports are well formed (keys, counts, ranges) and that the scoring is
consistent, never what score a model gets. One consistency check is exact: an untrained
side network's logits equal the backbone's, so its rows must equal the backbone's row.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math

import pytest
import torch
from longside.eval import chapterbreak, common, icl, passkey, ppl
from longside.errors import DataError
from longside.eval.common import EvalError

from longside.cli import eval as cli
from longside.config import SideNetConfig
from longside.model import LongSideModel

W = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while these tests run: the forwards here are small, and on a
    shared 2-core machine two spinning OpenMP threads measured ~5-10x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small(smollm2):
    """An untrained side network with a 128-token window, and its report identifiers.

    Without the token cache, so its scores equal the bare backbone's exactly (the checks
    below rely on that; the token cache is tested in test_model.py)."""
    model = LongSideModel(smollm2, SideNetConfig(window=W, token_cache=False))
    return model, common.model_info(model, None, note="test model")


def _check_report(result: dict, evaluation: str) -> None:
    assert result["evaluation"] == evaluation
    assert set(result) >= {"config", "model", "data", "git_commit", "results", "elapsed_s"}
    assert result["model"]["backbone"] == "smollm2-135m"
    assert len(result["model"]["side_state_hash"]) == 16
    assert result["config"]["window"] == W
    json.dumps(result)  # JSON-ready as it is


def _png(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the shared scoring helper ---------------------------------------------------------------

def test_score_after_prefix_matches_backbone_and_restores_memory(small):
    model, _ = small
    tok = model.backbone.tokenizer
    prefix = common.encode(tok, "It is a truth universally acknowledged, that a single man in possession "
                                "of a good fortune, must be in want of a wife. " * 12)
    cands = [common.encode(tok, " However little known"), common.encode(tok, " The cat sat on the mat")]
    assert len(prefix) > W  # so part of it goes to memory
    with_mem = common.score_after_prefix(model, prefix, cands, window=W)
    bare = common.score_backbone(model.backbone, prefix, cands, context=W)
    for a, b in zip(with_mem, bare):  # untrained side network == backbone, at the same local context
        assert a.n_tokens == b.n_tokens
        assert a.logprob == pytest.approx(b.logprob, rel=1e-4, abs=1e-3)
        assert a.logprob < 0
    assert len(model.memory.banks[0]) == 0  # the helper leaves no memory behind
    # an evaluation window below the model's: segments and context of that size
    small_w = [common.score_after_prefix(model, prefix, cands, window=W // 2),
               common.score_backbone(model.backbone, prefix, cands, context=W // 2)]
    for a, b in zip(*small_w):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-4, abs=1e-3)
    assert small_w[0][0].logprob != pytest.approx(with_mem[0].logprob, rel=1e-4)
    with pytest.raises(EvalError, match="no room"):
        common.score_after_prefix(model, prefix, [list(range(W))], window=W)
    with pytest.raises(EvalError, match="window"):
        common.eval_window(model, W + 1)


def test_prefix_logits_equal_one_forward(smollm2):
    # a side network that changes the logits and reads memory, so a wrong cache would show
    model = LongSideModel(smollm2, SideNetConfig(window=W))
    with torch.no_grad():
        model.side.up.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    tok = model.backbone.tokenizer
    text = common.encode(tok, "Elinor wrote the letter twice, and each time the words came out wrong. " * 30)
    common.memorize(model, text[:2 * W], W)
    prefix, conts = text[2 * W:2 * W + 60], [text[400:420], text[300:305], [7]]
    for use_memory in (False, True):
        got = common.prefix_logits(model, prefix, conts, use_memory=use_memory)
        last = common.prefix_logits(model, prefix, conts, use_memory=use_memory, last_only=True)
        for c, g, gl in zip(conts, got, last):
            want = model(torch.tensor([prefix + c]), use_memory=use_memory, write_memory=False).logits[0, 59:]
            torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(gl, want[-1], atol=1e-4, rtol=1e-5)
    for c, g in zip(conts, common.backbone_prefix_logits(model.backbone, prefix, conts)):
        torch.testing.assert_close(g, common.backbone_hidden_logits(model.backbone, prefix + c, 59), atol=1e-4,
                                   rtol=1e-5)
    # no prefix at all (ICL with no demonstrations in the window): the last position only
    for g, c in zip(common.prefix_logits(model, [], conts[:2], use_memory=True, last_only=True), conts):
        torch.testing.assert_close(g, model(torch.tensor([c]), write_memory=False).logits[0, -1], atol=1e-4,
                                   rtol=1e-5)
    with pytest.raises(EvalError, match="exceed the window"):
        common.prefix_logits(model, prefix, [list(range(W))], use_memory=True)
    with pytest.raises(EvalError, match="empty prefix"):
        common.backbone_prefix_logits(model.backbone, [], conts)


def test_memorize_writes_what_forward_writes(smollm2):
    model = LongSideModel(smollm2, SideNetConfig(window=W))
    ids = common.encode(model.backbone.tokenizer, "Marianne played the pianoforte until the candles burnt low. " * 12)
    assert common.memorize(model, ids, W) == math.ceil(len(ids) / W)
    spec = model.backbone.spec
    g = torch.Generator().manual_seed(0)
    q, tq = torch.randn(3, spec.num_heads, spec.head_dim, generator=g), torch.randn(3, spec.hidden_size, generator=g)

    def contents():
        bank = model.memory.banks[0]
        return len(bank), bank.search(q, 2), bank.search_tokens(tq, 4)

    fast = contents()
    model.reset_memory()
    for a in range(0, len(ids), W):
        model(torch.tensor([ids[a:a + W]]), return_logits=False)
    assert fast[0] == len(ids)
    torch.testing.assert_close(fast, contents(), atol=1e-4, rtol=1e-5)
    # suffixes of one text a window apart share segments: each is encoded once, same memory
    encoded: dict = {}
    model.reset_memory()
    common.memorize(model, ids[W:], W, encoded)
    assert len(encoded) == math.ceil((len(ids) - W) / W)
    model.reset_memory()
    common.memorize(model, ids, W, encoded)
    assert len(encoded) == math.ceil(len(ids) / W)  # only the first segment was new
    torch.testing.assert_close(contents(), fast, atol=1e-4, rtol=1e-5)


# -- perplexity ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ppl_report(small):
    model, info = small
    config = ppl.PplConfig(window=W, memory_tokens=(256,), buckets=(0, 128, 256), max_tokens=384, max_books=1,
                           native_context=512, native_stride=256)
    return ppl.run(model, info, config)


def test_ppl_report(ppl_report, tmp_path):
    _check_report(ppl_report, "ppl")
    res = ppl_report["results"]
    assert res["tokens_scored"] == 383
    assert list(res["rows"]) == [f"backbone@{W}", "backbone@512", "longside memory 0", "longside memory 256"]
    for row in res["rows"].values():
        assert row["n_tokens"] == 383
        assert sum(b["n_tokens"] for b in row["buckets"]) == 383
        assert [b["lo"] for b in row["buckets"]] == [0, 128, 256]
        assert 1 < row["ppl"] < 1e5 and math.isfinite(row["ppl"])
    local = res["rows"][f"backbone@{W}"]["ppl"]
    assert res["rows"]["longside memory 0"]["ppl"] == pytest.approx(local, rel=1e-4)
    assert res["rows"]["longside memory 256"]["ppl"] == pytest.approx(local, rel=1e-4)
    # the first segment sees the same tokens whatever the context: identical first bucket
    assert res["rows"]["backbone@512"]["buckets"][0]["ppl"] == pytest.approx(
        res["rows"][f"backbone@{W}"]["buckets"][0]["ppl"], rel=1e-4)
    ppl.plot(ppl_report, tmp_path / "ppl.png")
    _png(tmp_path / "ppl.png")


def test_ppl_reads_the_unseen_split(small):
    """`--split unseen` scores Moby-Dick (prose neither training nor the cache fit read);
    any other split is refused before work starts."""
    model, info = small
    config = ppl.PplConfig(window=W, memory_tokens=(256,), buckets=(0, 128), max_tokens=300, max_books=1,
                           rows=("off",), split="unseen")
    try:
        report = ppl.run(model, info, config)
    except DataError as e:  # the source could not be fetched here
        pytest.skip(str(e))
    assert report["data"] == {"books": "prepared:unseen", "titles": ["Moby-Dick; or, The Whale"]}
    with pytest.raises(EvalError, match="split must be test or unseen"):
        ppl.run(model, info, dataclasses.replace(config, split="train"))


def test_ppl_shares_one_backbone_pass_with_the_same_scores(smollm2):
    # the shipped side network (memory reads change its logits), three rows reading each
    # segment's shared encoding against each row run alone, as before the sharing; back to
    # back segments (the carried window's reads have their own test below)
    import torch.nn.functional as F

    from longside.data import load_books

    model = LongSideModel.from_pretrained(backbone=smollm2).eval()
    model.use_window_carry(0)
    book = load_books("test")[0]
    ids = torch.tensor([t for ch in common.book_chapters(smollm2.tokenizer, book) for t in ch][:3 * W + 1])
    rows = [None, (model, False), (common.with_capacity(model, 2 * W), True)]

    class Bar:
        def update(self, n):
            pass

    shared = ppl._segmented_nll(ids, W, smollm2, rows, model.config.memory_layer, Bar())
    alone = rows[2][0]
    alone.reset_memory()
    nll = []
    with torch.no_grad():
        for a in range(0, len(ids) - 1, W):
            seg = ids[a:a + W][None]
            nll.append(F.cross_entropy(alone(seg).logits[0][:len(ids[a + 1:a + 1 + W])], ids[a + 1:a + 1 + W],
                                       reduction="none"))
    torch.testing.assert_close(shared[2], torch.cat(nll), atol=1e-4, rtol=1e-4)
    assert (shared[2][W:] - shared[1][W:]).abs().max() > 1e-3  # memory was read
    bare = common.backbone_hidden_logits(smollm2, ids[:W].tolist(), 0)
    torch.testing.assert_close(shared[0][:W - 1], F.cross_entropy(bare[:W - 1], ids[1:W], reduction="none"))


def test_forward_refuses_an_encoding_it_cannot_use(smollm2):
    from longside.errors import LongsideError

    model = LongSideModel(smollm2, SideNetConfig(window=W, token_cache=False))
    seg = torch.arange(10, 30)[None]
    other = smollm2.encode(torch.arange(10, 25)[None], memory_layer=model.config.memory_layer)
    with pytest.raises(LongsideError, match="very ids"):
        model(seg, encoded=other)
    with pytest.raises(LongsideError, match="very ids"):
        model(seg, encoded=smollm2.encode(seg))  # no memory-layer keys
    bm = LongSideModel(smollm2, SideNetConfig(window=W, token_cache=False, backbone_memory_layers=[20]))
    with pytest.raises(LongsideError, match="backbone memory"):
        bm(seg, encoded=smollm2.encode(seg, memory_layer=model.config.memory_layer))


def test_ppl_resumes_from_the_books_it_kept(small, tmp_path, monkeypatch):
    model, info = small
    path = tmp_path / "kept.json"
    config = ppl.PplConfig(window=W, memory_tokens=(256,), buckets=(0, 128), max_tokens=300, max_books=1,
                           native_context=256, native_stride=128, resume=str(path))
    first = ppl.run(model, info, config)["results"]
    assert list(json.loads(path.read_text())["books"]) == [first["books"][0]["title"]]
    read = []
    real = ppl._segmented_nll
    monkeypatch.setattr(ppl, "_segmented_nll", lambda tokens, *a: read.append(len(tokens)) or real(tokens, *a))
    both = ppl.run(model, info, dataclasses.replace(config, max_books=2))["results"]
    assert len(read) == 1 and len(both["books"]) == 2  # only the second book was scored
    assert both["books"][0] == first["books"][0]
    fresh = ppl.run(model, info, dataclasses.replace(config, max_books=2, resume=None))["results"]
    for name, row in fresh["rows"].items():
        assert both["rows"][name]["ppl"] == pytest.approx(row["ppl"], rel=1e-6)
        assert both["rows"][name]["per_book"] == pytest.approx(row["per_book"], rel=1e-6)
    kept = path.read_text()
    other = json.loads(kept)
    other["books"][first["books"][0]["title"]]["ids_sha256"] = "0" * 64
    path.write_text(json.dumps(other))
    with pytest.raises(EvalError, match="other text"):
        ppl.run(model, info, config)
    path.write_text(kept)
    with pytest.raises(EvalError, match="another run.*config"):
        ppl.run(model, info, dataclasses.replace(config, max_tokens=200))
    with pytest.raises(EvalError, match="another run.*side_state_hash"):  # another checkpoint
        ppl.run(model, {**info, "side_state_hash": "0123456789abcdef"}, config)
    path.write_text(kept[:40])
    with pytest.raises(EvalError, match="unreadable"):
        ppl.run(model, info, config)
    assert path.read_text() == kept[:40]  # a refused file is left as it was


def test_ppl_rejects_bad_buckets(small):
    model, info = small
    with pytest.raises(EvalError, match="buckets"):
        ppl.run(model, info, ppl.PplConfig(window=W, buckets=(5, 100)))


def test_ppl_scores_only_the_rows_asked_for(smollm2):
    # a model whose backbone reads memory: its memory row must differ from memory off
    model = LongSideModel(smollm2, SideNetConfig(window=W, token_cache=False, backbone_memory_layers=[20]))
    info = common.model_info(model, None, note="test model")
    config = ppl.PplConfig(window=W, memory_tokens=(256,), buckets=(0, 128), max_tokens=384, max_books=1,
                           rows=("off", "memory"))
    res = ppl.run(model, info, config)["results"]["rows"]
    assert list(res) == ["longside memory 0", "longside memory 256"]
    first_off, first_mem = (res[r]["buckets"][0]["ppl"] for r in res)
    assert first_mem == pytest.approx(first_off, rel=1e-4)  # nothing in memory yet
    assert abs(res["longside memory 256"]["buckets"][1]["ppl"] / res["longside memory 0"]["buckets"][1]["ppl"] - 1) > 1e-3
    with pytest.raises(EvalError, match="rows"):
        ppl.run(model, info, dataclasses.replace(config, rows=("mem",)))


# -- ChapterBreak ---------------------------------------------------------------------------

def test_book_items_are_real_chapter_breaks(smollm2):
    from longside.data import load_books

    book = dict(load_books("test")[5])
    config = chapterbreak.ChapterBreakConfig(prefix_tokens=(256, 1024), candidate_tokens=32, items_per_book=3)
    items = chapterbreak.book_items(smollm2.tokenizer, [book], config)
    chapters = common.book_chapters(smollm2.tokenizer, book)
    assert len(items) == 3
    for it in items:
        i = it["chapter"]
        assert it["candidates"][it["label"]] == chapters[i][:32]  # the true next chapter's opening
        assert it["prefix"] == [t for ch in chapters[:i] for t in ch][-1024:]  # ends at the break
        openings = {tuple(ch[:32]) for ch in chapters[i + 1:]}
        others = [c for j, c in enumerate(it["candidates"]) if j != it["label"]]
        assert len(others) == 5 and all(tuple(c) in openings for c in others)  # later chapters only


def test_chapterbreak_report(small, tmp_path):
    model, info = small
    config = chapterbreak.ChapterBreakConfig(window=W, prefix_tokens=(256, 512), candidate_tokens=32,
                                             items_per_book=1, max_items=1, max_books=1, native_context=256)
    result = chapterbreak.run(model, info, config)
    _check_report(result, "chapterbreak")
    res = result["results"]
    assert res["chance"] == pytest.approx(1 / 6)
    assert res["n_items"] == 1 and list(res["by_prefix_tokens"]) == ["256", "512"]
    rows = {f"backbone@{W}", "backbone@256", "longside memory off", "longside memory"}
    assert res["protocols"] == ["likelihood", "pmi"]
    for length, entry in res["by_prefix_tokens"].items():
        assert entry["n_items"] == 1 and set(entry["rows"]) == rows
        for name, row in entry["rows"].items():
            for p in res["protocols"]:
                if name == "backbone@256" and length == "512":  # the prefix does not fit its context
                    assert row["n_items"] == 0 and row[p] == {"correct": 0, "accuracy": None}
                else:
                    assert row["n_items"] == 1
                    assert row[p]["accuracy"] in (0.0, 1.0) and row[p]["correct"] == row[p]["accuracy"]
    item = res["items"][0]
    assert 0 <= item["label"] < 6 and item["prefix_tokens"] == 512
    # untrained side network == backbone at the same window, under both protocols
    assert item["predicted"]["longside memory"] == item["predicted"]["longside memory off"]
    assert item["predicted"][f"backbone@{W}"] == item["predicted"]["longside memory off"]
    chapterbreak.plot(result, tmp_path / "cb.png")
    _png(tmp_path / "cb.png")


def test_chapterbreak_scores_only_the_rows_asked_for(small):
    model, info = small
    config = chapterbreak.ChapterBreakConfig(window=W, prefix_tokens=(256,), candidate_tokens=32, items_per_book=1,
                                             max_items=1, max_books=1, rows=("off", "memory"))
    entry = chapterbreak.run(model, info, config)["results"]["by_prefix_tokens"]["256"]
    assert set(entry["rows"]) == {"longside memory off", "longside memory"}
    assert all(row["n_items"] == 1 for row in entry["rows"].values())
    with pytest.raises(EvalError, match="rows must be some of"):
        chapterbreak.run(model, info, dataclasses.replace(config, rows=("everything",)))


def test_chapterbreak_pmi_discounts_what_is_likely_without_the_prefix():
    after = [common.Continuation(-10.0, 5, False), common.Continuation(-15.0, 5, False)]  # means -2, -3
    alone = [common.Continuation(-5.0, 5, False), common.Continuation(-20.0, 5, False)]  # means -1, -4
    assert chapterbreak._picks(after, alone) == {"likelihood": 0, "pmi": 1}


def test_chapterbreak_reads_the_original_json(smollm2, tmp_path):
    path = tmp_path / "chapterbreak_ctx_512.json"
    ex = {"ctx": "She left the room. " * 40, "pos": "Morning came.", "negs": [f"Chapter text {i}." for i in range(5)]}
    path.write_text(json.dumps({"ao3": {"w1": [ex]}, "pg19": {"w2": [ex, ex]}}))
    config = chapterbreak.ChapterBreakConfig(candidate_tokens=4, subset="pg19")
    items = chapterbreak.json_items(smollm2.tokenizer, path, config)
    assert len(items) == 2
    for it in items:
        assert len(it["candidates"]) == 6 and all(len(c) <= 4 for c in it["candidates"])
        assert it["candidates"][it["label"]] == common.encode(smollm2.tokenizer, "Morning came.")[:4]


# -- ICL ------------------------------------------------------------------------------------

def test_icl_report(small, tmp_path):
    model, info = small
    config = icl.IclConfig(window=W, tasks=("mr2", "source4"), k_window=2, n_memory=8, n_test=2, seeds=2)
    result = icl.run(model, info, config)
    _check_report(result, "icl")
    res = result["results"]
    assert list(res["tasks"]) == ["mr2", "source4"]
    assert res["chance"] == {"mr2": 0.5, "source4": 0.25}
    for task in res["tasks"].values():
        assert task["n_test"] == 2 and task["window_demo_tokens"] <= W
        assert set(task["rows"]) == set(icl.ROWS)
        for row in task["rows"].values():
            for p in icl.PROTOCOLS:
                assert len(row[p]["per_seed"]) == 2
                assert all(a in (0.0, 0.5, 1.0) for a in row[p]["per_seed"])
                assert row[p]["std"] >= 0
            assert all(o <= lab for o, lab in zip(row["open"]["per_seed"], row["label"]["per_seed"]))
        assert task["rows"]["longside memory"] == task["rows"]["backbone k-shot"]  # untrained == backbone
    for row in res["average"].values():
        assert 0 <= row["label"]["mean"] <= 1
    icl.plot(result, tmp_path / "icl.png")
    _png(tmp_path / "icl.png")


def test_icl_refuses_demonstrations_that_cannot_fit(small):
    model, info = small
    with pytest.raises(EvalError, match="k-window"):
        icl.run(model, info, icl.IclConfig(window=W, tasks=("mr2",), k_window=20, n_memory=1, n_test=1, seeds=1))


# -- passkey --------------------------------------------------------------------------------

def test_passkey_report(small, tmp_path):
    model, info = small
    config = passkey.PasskeyConfig(window=W, lengths=(256,), depths=(0.0, 1.0), trials=1, filler="repeat")
    result = passkey.run(model, info, config)
    _check_report(result, "passkey")
    res = result["results"]
    assert res["rows"] == ["longside memory", f"backbone@{W}", "backbone@8192 (teacher)"]
    assert len(res["trials"]) == 2
    # the teacher sees the whole text: the key is in its window at every depth
    assert all(t["backbone@8192 (teacher)"] is not None for t in res["trials"])
    deep, shallow = res["trials"]
    assert not deep["needle_in_window"] and shallow["needle_in_window"]
    assert len(deep["key"]) == 5 and deep["key"].isdigit()
    for r in res["rows"]:
        assert set(res["accuracy"][r]["256"]) == {"0.0", "1.0"}
        assert 0 <= res["overall"][r] <= 1
    assert result["config"]["memory_tokens"] >= 256
    passkey.plot(result, tmp_path / "pk.png")
    _png(tmp_path / "pk.png")
    # where the text does not fit the native context, the teacher row is not run (None)
    short = copy.copy(model.backbone)
    short.spec = dataclasses.replace(short.spec, max_positions=200)
    narrow = LongSideModel(short, SideNetConfig(window=W, token_cache=False), side=model.side)
    res = passkey.run(narrow, info, config)["results"]
    assert res["rows"][2] == "backbone@200 (teacher)" and res["overall"]["backbone@200 (teacher)"] is None
    assert all(t["backbone@200 (teacher)"] is None for t in res["trials"])
    passkey.plot(passkey.run(narrow, info, config), tmp_path / "pk2.png")
    _png(tmp_path / "pk2.png")
    no_teacher = passkey.run(model, info, dataclasses.replace(config, teacher=False))["results"]
    assert no_teacher["rows"] == ["longside memory", f"backbone@{W}"]


def test_passkey_book_filler_places_the_needle(small):
    model, info = small
    config = passkey.PasskeyConfig(window=W, lengths=(200,), depths=(0.5,), trials=1, filler="book", seed=3)
    trial = passkey.run(model, info, config)["results"]["trials"][0]
    assert trial["length"] == 200 and 0 < trial["needle_at"] < 200
    para = dataclasses.replace(config, question="paraphrase")
    result = passkey.run(model, info, para)
    assert result["config"]["question"] == "paraphrase" and result["results"]["trials"][0]["length"] == 200
    with pytest.raises(EvalError, match="question"):
        passkey.run(model, info, dataclasses.replace(config, question="riddle"))


# -- the command line -----------------------------------------------------------------------

def _args(name: str, argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args([name, *argv])


def test_cli_configs_take_quick_defaults_and_overrides():
    cfg = cli.make_config("passkey", _args("passkey", ["--quick", "--lengths", "300", "--long", "--seed", "4"]))
    assert cfg.lengths == (300, 131072, 262144) and cfg.seed == 4 and cfg.trials == passkey.PasskeyConfig.quick().trials
    assert cli.make_config("passkey", _args("passkey", ["--no-teacher"])).teacher is False
    assert cli.make_config("passkey", _args("passkey", [])).teacher is True
    cfg = cli.make_config("ppl", _args("ppl", ["--memory-tokens", "4096"]))
    assert cfg.memory_tokens == (4096,) and cfg.window is None
    assert cli.make_config("icl", _args("all", ["--quick"])) == icl.IclConfig.quick()


def test_token_cache_option_changes_the_model(smollm2):
    model, info = LongSideModel(smollm2, SideNetConfig(window=W)), {}
    cli.apply_token_cache(model, info, _args("ppl", []).token_cache)
    assert model.config.token_cache and model.config.token_copy_k > 0 and info["token_cache"] == "on"
    cli.apply_token_cache(model, info, _args("ppl", ["--token-cache", "nocopy"]).token_cache)
    assert model.config.token_copy_k == 0 and info["token_cache"] == "nocopy"
    cli.apply_token_cache(model, info, _args("ppl", ["--token-cache", "off"]).token_cache)
    assert not model.config.token_cache and info["token_cache"] == "off" and not info["side_config"]["token_cache"]
    with pytest.raises(EvalError, match="token-cache"):
        cli.apply_token_cache(model, info, "sometimes")


def test_cli_rejects_bad_input(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        cli.main(["ppl", "--data", str(tmp_path / "missing")])
    with pytest.raises(EvalError, match="png"):
        cli._plot_path(str(tmp_path / "x.pdf"), "ppl", False)
    from longside.errors import CheckpointError
    with pytest.raises(CheckpointError):
        common.load_model(tmp_path, backbone=object())


@pytest.mark.slow
def test_eval_all_quick_end_to_end(tmp_path):
    """`longside eval all --quick` with the default model, as a user runs it."""
    out = tmp_path / "all.json"
    assert cli.main(["all", "--quick", "--json", str(out), "--plot", str(tmp_path / "q.png")]) == 0
    report = json.loads(out.read_text())
    assert set(report["reports"]) == {"ppl", "chapterbreak", "icl", "passkey"}
    for name in report["reports"]:
        _png(tmp_path / f"q_{name}.png")


def test_ppl_reads_a_carried_window_as_generation_does(smollm2):
    """With window_carry, the perplexity rows read the book as LocalWindow reads a text: the
    NLL of every token equals the one from the logits of incremental decoding."""
    from longside.inference.window import LocalWindow

    model = LongSideModel(smollm2, SideNetConfig(window=W, capacity_tokens=4096))
    with torch.no_grad():
        model.side.up.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    model.use_window_carry(32)
    tokens = torch.randint(100, 5000, (2 * W + 40,), generator=torch.Generator().manual_seed(3))
    got = ppl._carried_nll(tokens, W, model, True)
    model.reset_memory()
    logits = LocalWindow(model, 1).feed(tokens[None], all_logits=True)[0]
    want = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:], reduction="none")
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    assert len(model.memory.banks[0]) == 2 * W - 32  # two full segments: each token once
    with pytest.raises(Exception, match="reset_memory"):
        model.use_window_carry(16)  # memory holds text read with another carry
    model.reset_memory()
    with pytest.raises(Exception, match="window_carry"):
        model.use_window_carry(W)
    assert _args("ppl", ["--window-carry", "8"]).window_carry == 8


def test_cli_reads_memory_with_the_sinks_and_distance_asked_for(tmp_path, smollm2, monkeypatch):
    """--memory-sinks / --memory-distance reach the model the evaluation runs and its report;
    a value out of range is refused with the setting's name."""
    seen = {}

    def fake_run(model, info, cfg, data=None):
        seen.update(sinks=model.config.memory_sink_tokens, distance=model.side.reader.distance, info=info)
        return {"evaluation": "ppl"}
    monkeypatch.setattr(ppl, "run", fake_run)
    monkeypatch.setattr(cli, "load_model", lambda path: (LongSideModel(smollm2, SideNetConfig(window=W)), {}))
    assert cli.main(["ppl", "--memory-sinks", "4", "--memory-distance", "48", "--json", str(tmp_path / "r.json")]) == 0
    assert (seen["sinks"], seen["distance"]) == (4, 48)
    assert seen["info"]["side_config"]["memory_sink_tokens"] == 4 and seen["info"]["side_config"]["memory_distance"] == 48
    from longside.errors import CheckpointError
    with pytest.raises(CheckpointError, match="memory_distance"):
        cli.main(["ppl", "--memory-distance", "-1"])
