import pytest
import torch

from longside.backbone import Backbone
from longside.config import SideNetConfig
from longside.errors import CheckpointError, LongsideError
from longside.kernels import ggml_cpu
from longside.model import LongSideModel


def _tiny_backbone(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return Backbone(LlamaForCausalLM(cfg), None, "tiny", "f" * 16)


def _cfg(**kw):
    base = dict(reduction=2, layer_stride=1, memory_layer=1, k_chunks=2, chunk_size=4, window=16,
                capacity_tokens=256, memory_attention="gated")  # these tests train the gate
    return SideNetConfig(**{**base, **kw})


def test_forward_reads_then_writes_and_init_is_backbone():
    bb = _tiny_backbone()
    model = LongSideModel(bb, _cfg(token_cache=False))
    ids = torch.randint(0, 96, (2, 16))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 16, 96) and out.loss.ndim == 0 and out.n_tokens == 30
    assert model.memory.lengths() == [16, 16]
    out2 = model(ids, labels=ids)  # now memory is not empty, the side output still starts at zero
    assert torch.allclose(out2.logits, bb.logits(ids), atol=1e-5)
    model.reset_memory([0])
    assert model.memory.lengths() == [0, 32]


def test_token_cache_starts_as_the_backbone_and_copies_repeated_text():
    bb = _tiny_backbone()
    model = LongSideModel(bb, _cfg())
    ids = torch.randint(0, 96, (1, 16))
    first = model(ids, labels=ids)  # empty memory: the backbone's distribution exactly
    torch.testing.assert_close(first.logits, bb.logits(ids), atol=1e-5, rtol=0)
    assert len(model.memory.banks[0].tokens) == 15  # the 16th token waits for its successor
    again = model(ids, labels=ids)  # same text again: every context is stored, with its next token
    lp = torch.log_softmax(again.logits, -1)
    mixed = again.logits != bb.logits(ids)
    assert mixed.any() and torch.allclose(lp.exp().sum(-1), torch.ones(1, 16), atol=1e-4)
    assert again.loss < first.loss - 0.1
    off = model(ids, labels=ids, use_memory=False)
    torch.testing.assert_close(off.loss, first.loss)


def test_token_cache_can_be_left_out_of_a_read_or_dropped():
    bb = _tiny_backbone()
    model = LongSideModel(bb, _cfg())
    ids = torch.randint(0, 96, (1, 16))
    model(ids)
    with_cache = model(ids, write_memory=False).logits
    alone = model(ids, write_memory=False, token_cache=False).logits
    assert not torch.equal(with_cache, alone)  # the repeated text is copied only with the cache
    torch.testing.assert_close(alone, bb.logits(ids), atol=1e-5, rtol=0)  # untrained memory attention adds 0
    with pytest.raises(LongsideError, match="reset_memory"):
        model.drop_token_cache()  # memory holds text written with the cache
    model.reset_memory()
    model.drop_token_cache(only_copy=True)
    assert model.config.token_cache and model.config.token_copy_k == 0
    model(ids)
    hits = model.read_segment(ids, use_memory=True)[3]
    assert hits.copy_len.shape[-1] == 0 and hits.sims.shape[-1] > 0  # the neighbour vote alone
    assert not torch.equal(model(ids, write_memory=False).logits, alone)
    model.reset_memory()
    model.drop_token_cache()
    model(ids)
    assert not model.config.token_cache and model.memory.banks[0].tokens is None
    torch.testing.assert_close(model(ids, write_memory=False).logits, alone)


def test_token_cache_gate_trains():
    model = LongSideModel(_tiny_backbone(), _cfg())
    # "2 3" is followed by 4, 5 and 6, after contexts that match for 3, 2 and 2 tokens: exact
    # matches of several lengths that disagree (equal lengths would leave the copy scale
    # without a gradient)
    ids = torch.tensor([[10, 1, 2, 3, 4, 20, 5, 2, 3, 5, 30, 1, 2, 3, 6, 40]])
    model(ids)
    model(ids, labels=ids).loss.backward()
    reader = model.side.token_reader
    for name in ("gate", "copy_gate", "copy_log_scale"):
        grad = getattr(reader, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
        assert f"token_reader.{name}" in model.side.state_dict()


def test_copy_read_recalls_what_followed_the_same_words_in_memory():
    bb = _tiny_backbone()
    model = LongSideModel(bb, _cfg(token_copy_k=4))
    g = torch.Generator().manual_seed(1)
    fact = torch.tensor([[7, 8, 9, 10, 11, 42, 43]])  # "... 7 8 9 10 11" is followed by the answer 42 43
    model(torch.cat([torch.randint(50, 96, (1, 9), generator=g), fact], 1))
    ask = torch.cat([torch.randint(50, 96, (1, 11), generator=g), fact[:, :5]], 1)
    out, h, keys, hits = model.read_segment(ask, use_memory=True)
    assert hits.copy_len.shape == (1, 16, 4)
    assert hits.copy_len[0, -1, 0] == 5 and hits.copy_nxt[0, -1, 0] == 42
    assert (hits.copy_len[0, :11] == 0).all()  # random filler matches nothing of length >= 2
    reader = model.side.token_reader
    with torch.no_grad():
        reader.gate.fill_(0.0)
        reader.gate[0] = -30.0  # neighbours off: only the copy read speaks
        reader.copy_gate.copy_(torch.tensor([-2.0, 2.0, 0.0, 0.0, 0.0]))
    logits = model(ask, write_memory=False).logits
    assert logits[0, -1].argmax() == 42
    assert torch.equal(logits[0, :11], model(ask, write_memory=False, use_memory=False).logits[0, :11])
    off = LongSideModel(bb, _cfg(token_copy_k=0), side=None)
    assert not off.side.token_reader.copy and "token_reader.copy_gate" not in off.side.state_dict()


def test_rows_never_read_each_other():
    bb = _tiny_backbone()
    model = LongSideModel(bb, _cfg())
    with torch.no_grad():
        model.side.up.weight.normal_(0, 0.5)
    a, b = torch.randint(0, 96, (1, 16)), torch.randint(0, 96, (1, 16))
    q = torch.randint(0, 96, (1, 16))
    model(torch.cat([a, b]))  # row 0 memorises a, row 1 memorises b
    both = model(torch.cat([q, q]), write_memory=False).logits
    solo = LongSideModel(bb, _cfg(), side=model.side)
    solo(a)
    alone = solo(q, write_memory=False).logits
    assert torch.allclose(both[0], alone[0], atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-4)


def test_bad_input():
    model = LongSideModel(_tiny_backbone(), _cfg())
    with pytest.raises(LongsideError, match="exceeds the window"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(LongsideError, match="non-empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    model(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(LongsideError, match="batch size"):
        model(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(LongsideError, match="integer token ids"):
        model(torch.zeros(2, 4))
    with pytest.raises(LongsideError, match="must lie in"):
        model(torch.full((2, 4), 96))
    with pytest.raises(LongsideError, match="labels"):
        model(torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(LongsideError, match="non-empty"):
        model([[1, 2]])


def test_no_gradient_reaches_the_backbone():
    bb = _tiny_backbone()
    model = LongSideModel(bb, _cfg())
    with torch.no_grad():
        model.side.up.weight.normal_(0, 0.1)
    ids = torch.randint(0, 96, (1, 16))
    model(ids)
    model(ids, labels=ids).loss.backward()
    assert not any(p.requires_grad or p.grad is not None for p in bb.model.parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())


def _saved_bytes(layers: int) -> int:
    """Bytes autograd keeps for backward in one training step of the same side network."""
    bb = _tiny_backbone(layers)
    model = LongSideModel(bb, _cfg(layer_stride=layers // 4, memory_layer=layers // 2))
    ids = torch.randint(0, 96, (1, 16))
    model(ids)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, return_logits=False).loss.backward()
    return total


def test_training_memory_independent_of_backbone_depth():
    """A 16-block backbone costs the side network's graph no more than a 4-block one."""
    assert _saved_bytes(16) == _saved_bytes(4)


def test_save_load_roundtrip_and_refusals(tmp_path):
    bb = _tiny_backbone()
    model = LongSideModel(bb, _cfg())
    with torch.no_grad():
        model.side.up.weight.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "ck", dtype=torch.float32)
    again = LongSideModel.from_pretrained(tmp_path / "ck", backbone=bb)
    ids = torch.randint(0, 96, (1, 12))
    assert torch.equal(model(ids, write_memory=False).logits, again(ids, write_memory=False).logits)
    other = Backbone(bb.model, None, "tiny", "0" * 16)
    with pytest.raises(CheckpointError, match="fingerprint"):
        LongSideModel.from_pretrained(tmp_path / "ck", backbone=other)
    with pytest.raises(CheckpointError, match="not a longside checkpoint"):
        LongSideModel.from_pretrained(tmp_path / "nothing", backbone=bb)
    w = tmp_path / "ck" / "side_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        LongSideModel.from_pretrained(tmp_path / "ck", backbone=bb)


def test_shipped_checkpoint_is_the_default(smollm2):
    """The trained SmolLM2 side network ships in the package and loads by default."""
    from longside.model import SHIPPED_CHECKPOINT

    assert (SHIPPED_CHECKPOINT / "side_config.json").exists(), "the shipped checkpoint is missing"
    model = LongSideModel.from_pretrained(backbone=smollm2)
    assert model.config.backbone_fingerprint == smollm2.fingerprint
    assert model.side.up.weight.abs().sum() > 0  # trained: the side network is no longer silent
    ids = smollm2.tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    out = model(ids, write_memory=False)
    assert not torch.allclose(out.logits, smollm2.logits(ids), atol=1e-3)


def test_fit_token_cache_learns_to_trust_a_cache_that_repeats():
    import numpy as np

    from longside.training.token_cache_fit import fit_token_cache

    model = LongSideModel(_tiny_backbone(), _cfg())
    rng = np.random.default_rng(0)
    books = [np.tile(rng.integers(0, 96, 24), 6) for _ in range(2)]  # text that repeats itself
    before = model.side.token_reader.gate.detach().clone()
    report = fit_token_cache(model, books, segments=6, steps=60, progress=False)
    assert report["tokens"] == 2 * 5 * 15
    assert report["ppl_with_cache"] < 0.5 * report["ppl_model"]
    assert not torch.equal(before, model.side.token_reader.gate.detach())


def test_fit_token_cache_with_recall_tasks_answers_them():
    import numpy as np

    from longside.training.token_cache_fit import fit_token_cache

    model = LongSideModel(_tiny_backbone(), _cfg())
    rng = np.random.default_rng(1)
    books = [rng.integers(0, 96, 96) for _ in range(2)]
    tasks = []
    for _ in range(6):  # "5 6 7 8 a b" stated in the first window, asked for in the third
        fact = [5, 6, 7, 8, *rng.integers(60, 96, 2)]
        ids = np.concatenate([rng.integers(20, 50, 4), fact, rng.integers(20, 50, 32), fact]).astype(np.int64)
        labels = np.full_like(ids, -100)
        labels[-2:] = ids[-2:]
        tasks.append((ids, labels))
    report = fit_token_cache(model, books, segments=6, steps=80, tasks=tasks, progress=False)
    assert report["tasks"] == 6 and report["task_tokens"] == 12
    assert report["task_share_above_half_model"] < 0.5 < report["task_share_above_half"]
    assert report["task_ppl_with_cache"] < report["task_ppl_model"]


def test_fit_token_cache_with_classification_documents_learns_their_labels():
    import numpy as np

    from longside.training.token_cache_fit import fit_token_cache

    model = LongSideModel(_tiny_backbone(), _cfg())
    rng = np.random.default_rng(2)
    books = [rng.integers(0, 96, 96) for _ in range(2)]
    patterns = [(list(rng.integers(20, 60, 3)), 90 + i % 2) for i in range(6)]  # six inputs, labels 90/91
    docs = []
    for _ in range(4):
        ids, labels = [], []
        while len(ids) < 60:
            text, label = patterns[int(rng.integers(6))]
            ids += [*text, 7, label, 8]  # text, "Label:", label, separator
            labels += [-100] * 4 + [label, -100]
        docs.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
    report = fit_token_cache(model, books, segments=6, steps=80, classify=docs, progress=False)
    assert report["classify_docs"] == 4 and report["classify_tokens"] > 0
    # the label of an input seen before is in memory; the model alone cannot know it
    assert report["classify_accuracy_with_cache"] > report["classify_accuracy_model"] + 0.3


def test_load_memory_refuses_a_bank_without_token_memory(tmp_path):
    from longside.errors import MemoryBankError

    bb = _tiny_backbone()
    plain = LongSideModel(bb, _cfg(token_cache=False))
    plain(torch.randint(0, 96, (1, 16)))
    plain.save_memory(tmp_path / "m.bank")
    model = LongSideModel(bb, _cfg())
    with pytest.raises(MemoryBankError, match="memorize the text again"):
        model.load_memory(tmp_path / "m.bank")


def test_training_loss_with_token_cache_equals_the_mixture_of_the_output():
    bb = _tiny_backbone()
    model = LongSideModel(bb, _cfg())
    ids = torch.randint(0, 96, (2, 16))
    model(ids)
    labels = ids.clone()
    labels[0, 5:9] = -100
    out = model(ids, labels=labels, write_memory=False)
    lp = torch.log_softmax(out.logits[:, :-1], -1)
    t = labels[:, 1:]
    ref = -lp.gather(2, t.clamp_min(0)[..., None])[..., 0][t != -100].mean()
    torch.testing.assert_close(out.loss, ref, atol=1e-4, rtol=1e-4)


def _token_hits(N: int, k: int, c: int, vocab: int, low: float, longest: int, no_neighbours, short_rows,
                short_from: int, no_matches):
    """Random token-cache hits, best first: rows `no_neighbours` without any neighbour, rows
    `short_rows` with fewer than k (padding from `short_from`), rows `no_matches` without a
    copy match; padding ids -1."""
    from longside.nn.token_cache import TokenHits

    sims = torch.sort(torch.rand(N, k) * (1 - low) + low, -1, descending=True).values
    sims[no_neighbours] = float("-inf")
    sims[short_rows, short_from:] = float("-inf")
    nxt = torch.randint(0, vocab, (N, k)).masked_fill(sims == float("-inf"), -1)
    lens = torch.randint(0, longest, (N, c))
    lens[no_matches] = 0
    cnxt = torch.randint(0, vocab, (N, c)).masked_fill(lens == 0, -1)
    return TokenHits(sims, nxt, lens, cnxt)


def _random_reader(copy: bool, spread: bool, scale: float):
    """A token-cache reader whose 14 numbers are moved off their defaults."""
    from longside.nn.token_cache import TokenCacheReader

    reader = TokenCacheReader(copy=copy, spread=spread)
    with torch.no_grad():
        for p in reader.parameters():
            p.add_(torch.randn_like(p) * scale)
    return reader


def _count_c_mix(monkeypatch) -> list:
    """A list that grows by one at each `ggml_cpu.token_cache_mix` call."""
    calls = []
    if ggml_cpu.available():
        mix = ggml_cpu.token_cache_mix
        monkeypatch.setattr(ggml_cpu, "token_cache_mix", lambda *a: (mix(*a), calls.append(1))[0])
    return calls


@pytest.mark.parametrize("path", ["c", "torch"])
def test_token_cache_mix_is_the_dense_mixture(path, monkeypatch):
    # mix computes only the voted tokens; it must equal log(pi_m p + pi_k votes_k + pi_c
    # votes_c) written out densely, with repeated tokens, padding and silent rows; a decode
    # step's rows take one C call for all of it, or the torch code
    monkeypatch.setenv("LONGSIDE_DECODE", path)
    calls = _count_c_mix(monkeypatch)
    torch.manual_seed(0)
    N, V, k, c = 12, 96, 8, 4
    reader = _random_reader(True, True, 0.3)
    hits = _token_hits(N, k, c, 6, 0.5, 9, slice(0, 3), slice(3, 6), 5, slice(0, 2))
    nxt, cnxt = hits.nxt, hits.copy_nxt
    logits = torch.randn(N, V) * 3
    with torch.no_grad():
        out = reader.mix(logits, hits, decode=True)
        lp = torch.log_softmax(logits, -1)
        ent = -(lp.exp() * lp).sum(-1)
        log_pi, wk, wc = reader._mixture(hits, ent, lp.max(-1).values)
    pi = log_pi.exp()
    dense = pi[:, :1] * lp.exp()
    dense = dense + pi[:, 1:2] * torch.zeros(N, V).scatter_add_(1, nxt.clamp_min(0), wk)
    dense = dense + pi[:, 2:] * torch.zeros(N, V).scatter_add_(1, cnxt.clamp_min(0), wc)
    torch.testing.assert_close(torch.log_softmax(out, -1), dense.log(), atol=1e-5, rtol=1e-5)
    silent = log_pi[:, 0] == 0
    assert silent[:2].all() and torch.equal(out[silent], logits[silent])  # untouched where memory is silent
    assert not silent[3:].any()
    assert len(calls) == (path == "c" and ggml_cpu.available())  # the mixture came from the path named


@pytest.mark.skipif(not ggml_cpu.available(), reason=f"the C kernels are not built: {ggml_cpu.BUILD_HINT}")
@pytest.mark.parametrize("copy,spread", [(True, True), (True, False), (False, True), (False, False)])
def test_token_cache_mix_in_c_equals_torch(copy, spread, monkeypatch):
    """The C mixture equals the torch one (gates, votes, weights) to float rounding, with or
    without the copy read and the spread features (copy candidates without the copy read get
    no votes), rows without neighbours or matches left bit for bit, a -inf logit included; a
    stored token past the vocabulary is refused, not read; segment reads keep the torch code."""
    calls = _count_c_mix(monkeypatch)
    torch.manual_seed(1)
    N, V, k, c = 9, 300, 16, 6
    reader = _random_reader(copy, spread, 0.5)
    hits = _token_hits(N, k, c, 5, 0.6, 12, 0, 4, 10, [0, 5])
    logits = torch.randn(N, V) * 4
    logits[7, 3] = float("-inf")
    with torch.no_grad():
        monkeypatch.setenv("LONGSIDE_DECODE", "torch")
        want = reader.mix(logits, hits, decode=True)
        assert not calls
        monkeypatch.setenv("LONGSIDE_DECODE", "c")
        torch.testing.assert_close(reader.mix(logits, hits), want, atol=2e-5, rtol=2e-5)
        assert not calls  # not a decode step: the torch code
        got = reader.mix(logits, hits, decode=True)
        assert len(calls) == 1
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        assert torch.equal(got[0], logits[0])  # no neighbour, no match: the model's logits
        hits.nxt[3, 0] = V  # a token the head has no logit for
        with pytest.raises(ValueError, match="outside the 300-token vocabulary"):
            reader.mix(logits, hits, decode=True)


def test_batch_rows_never_read_each_other(smollm2):
    """Row 1's logits are bit-equal whether row 0's memory is empty, shorter or longer than
    token_k (padding slots of a shorter row change nothing the token-cache reader computes)."""
    model = LongSideModel.from_pretrained(backbone=smollm2)
    assert model.config.token_cache and model.config.token_k > 20
    tok = smollm2.tokenizer
    fact = "Note for the file: the passcode is 4417. Keep it."
    filler = ("The river ran slowly past the mill, and the miller's daughter watched the boats "
              "go by while the evening bells rang over the fields. ")
    ask = tok("The passcode is", return_tensors="pt").input_ids
    rows = []
    for other in ("", filler[:40], filler * 6):
        model.init_memory(2)
        model.memorize(fact, row=1, progress=False)
        if other:
            model.memorize(other, row=0, progress=False)
        n0 = model.memory.lengths()[0]
        rows.append((n0, model(ask.repeat(2, 1), write_memory=False).logits[1]))
    assert rows[0][0] == 0 and 0 < rows[1][0] < model.config.token_k < rows[2][0]
    assert len(tok(fact).input_ids) < model.config.token_k  # row 1 holds fewer than k pairs
    for _, logits in rows[1:]:
        assert torch.equal(logits, rows[0][1])
