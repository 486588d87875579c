import pytest
import torch
from longside.memory_bank import BatchMemory, MemoryBank, TokenMemory

from longside.errors import MemoryBankError


def _unit(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_pairs_each_context_with_the_token_that_follows_across_adds():
    tm = TokenMemory(8, capacity=100)
    keys, ids = _unit(10), torch.arange(100, 110)
    tm.add(keys[:4], ids[:4])
    assert len(tm) == 3  # the 4th token waits for its successor
    tm.add(keys[4:], ids[4:])
    assert len(tm) == 9
    sims, nxt = tm.search(keys[:9], 1)
    assert torch.allclose(sims[:, 0], torch.ones(9), atol=5e-3)  # keys stored in bfloat16
    assert nxt[:, 0].tolist() == list(range(101, 110))  # token t's context predicts token t+1


def test_fifo_keeps_the_newest_pairs():
    tm = TokenMemory(8, capacity=5)
    keys, ids = _unit(12), torch.arange(12)
    tm.add(keys, ids)
    assert len(tm) == 5
    _, nxt = tm.search(keys, 5)
    assert set(nxt.flatten().tolist()) == {7, 8, 9, 10, 11}
    empty = TokenMemory(8, capacity=5)
    sims, nxt = empty.search(keys, 4)
    assert sims.shape == (12, 0) and nxt.shape == (12, 0)


def test_bad_shapes_are_refused():
    tm = TokenMemory(8, capacity=5)
    with pytest.raises(MemoryBankError, match="keys"):
        tm.add(torch.zeros(3, 7), torch.zeros(3, dtype=torch.long))
    with pytest.raises(MemoryBankError, match="queries"):
        tm.search(torch.zeros(3, 7), 2)


def _bank(**kw):
    return MemoryBank(num_kv_heads=2, head_dim=4, chunk_size=2, capacity_tokens=64, token_dim=8, token_layer=3, **kw)


def test_bank_saves_and_loads_its_token_memory(tmp_path):
    bank = _bank(owner="x")
    keys = _unit(9)
    bank.add(torch.randn(9, 2, 4), torch.randn(9, 2, 4), token_keys=keys, token_ids=torch.arange(9))
    bank.save(tmp_path / "b.bank")
    back = MemoryBank.load(tmp_path / "b.bank", expect_owner="x")
    assert back.token_layer == 3 and len(back.tokens) == 8
    for a, b in zip(bank.search_tokens(keys, 3), back.search_tokens(keys, 3)):
        torch.testing.assert_close(a, b)
    back.add(torch.randn(1, 2, 4), torch.randn(1, 2, 4), token_keys=_unit(1, seed=1), token_ids=torch.tensor([42]))
    _, nxt = back.search_tokens(keys[8:9], 1)
    assert nxt.item() == 42  # the pending last token survived the round trip
    with pytest.raises(MemoryBankError, match="token"):
        back.add(torch.randn(1, 2, 4), torch.randn(1, 2, 4))  # a token bank needs its token keys
    bank.clear()
    assert len(bank.tokens) == 0


def test_batch_pads_rows_with_fewer_pairs():
    mem = BatchMemory(2, num_kv_heads=2, head_dim=4, chunk_size=2, capacity_tokens=64, token_dim=8)
    keys = torch.stack([_unit(6), _unit(6, seed=2)])
    mem.add(torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4), token_keys=keys, token_ids=torch.arange(12).view(2, 6))
    mem.reset([1])
    sims, nxt = mem.search_tokens(keys, 3)
    assert sims.shape == (2, 6, 3) and torch.isinf(sims[1]).all() and torch.isfinite(sims[0]).all()


def test_match_finds_earlier_occurrences_and_their_exact_lengths():
    tm = TokenMemory(4, capacity=100, dtype=torch.float32)
    text = torch.tensor([5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 12, 13])
    tm.add(_unit(len(text), 4), text)
    lens, nxt = tm.match(torch.tensor([1, 5, 6, 7]), n_queries=4, k=4)
    assert lens.shape == nxt.shape == (4, 4)
    assert lens[:2].sum() == 0  # "1" and "1 5" never occurred
    assert (lens[2, 0], nxt[2, 0]) == (2, 7)  # "5 6" -> 7 (the first "5 6" starts the memory: its 5 is unknown)
    # "5 6 7": most recent first; the newer match runs 3 tokens back, the older one 2
    assert lens[3, :2].tolist() == [3, 2] and nxt[3, :2].tolist() == [12, 8]
    assert (lens[:, 2:] == 0).all() and (nxt[lens == 0] == 0).all()


def test_match_counts_back_through_memory_and_context_in_a_full_ring():
    tm = TokenMemory(4, capacity=8, dtype=torch.float32)
    text = torch.tensor([5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 12, 13])
    tm.add(_unit(len(text), 4), text)  # keeps the pairs of 8 9 10 11 5 6 7 12 (and 13 pending)
    lens, nxt = tm.match(torch.tensor([9, 10, 11, 5, 6]), n_queries=2, k=3)
    assert lens[:, 0].tolist() == [4, 5] and nxt[:, 0].tolist() == [6, 7]
    tm.add(_unit(2, 4, seed=3), torch.tensor([9, 10]))  # the index follows new text: 13 -> 9 is stored
    lens, nxt = tm.match(torch.tensor([12, 13]), n_queries=1, k=3)
    assert (lens[0, 0], nxt[0, 0]) == (2, 9)
    lens, _ = tm.match(torch.tensor([9, 10]), n_queries=1, k=3)
    assert lens.sum() == 0  # the older "9 10" left the ring; the newest has no successor yet
    tm.clear()
    assert tm.match(torch.tensor([9, 10]), 1, 3)[0].sum() == 0
    with pytest.raises(MemoryBankError, match="n_queries"):
        tm.match(torch.tensor([9, 10]), 3, 3)


def test_match_of_one_query_equals_the_batched_lookup():
    """A decode step's one query takes a path of its own (Python ints): it gives what the
    last row of a many-query lookup gives, on a small vocabulary full of repeats, long
    and short contexts, in a ring that wrapped."""
    g = torch.Generator().manual_seed(0)
    tm = TokenMemory(4, capacity=3000, dtype=torch.float32)
    text = torch.randint(0, 6, (4000,), generator=g)
    text[1000:1100] = text[200:300]  # a long repeat: orders up to 32 hit
    tm.add(_unit(len(text), 4), text)
    hits = 0
    for trial in range(60):
        n = int(torch.randint(2, 80, (1,), generator=g))
        ctx = torch.randint(0, 6, (n,), generator=g)
        if trial % 3 == 0:
            ctx = torch.cat([ctx, text[220:220 + trial % 40]])
        q = min(len(ctx), 3)  # >= 2: the many-query path
        one = tm.match(ctx, 1, 4)
        many = tm.match(ctx, q, 4)
        assert torch.equal(one[0], many[0][-1:]) and torch.equal(one[1], many[1][-1:]), trial
        hits += int(one[0][0, 0] > 0)
    assert hits > 30
    tiny = TokenMemory(4, capacity=8, dtype=torch.float32)  # one stored pair: no n-gram order yet
    tiny.add(_unit(2, 4), torch.tensor([3, 4]))
    assert tiny.match(torch.tensor([3, 4]), 1, 4)[0].sum() == 0
    text_, _, orders = tm._index()  # a one-token context: both candidate searches directly
    for t in range(6):
        stream = torch.cat([text_, torch.tensor([t])])
        one, many = tm._candidates_of_one(stream, orders, 4), tm._candidates(stream, orders, 1, 4)
        assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_match_survives_save_and_load(tmp_path):
    bank = _bank(owner="x")
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5])
    bank.add(torch.randn(9, 2, 4), torch.randn(9, 2, 4), token_keys=_unit(9), token_ids=ids)
    bank.save(tmp_path / "b.bank")
    back = MemoryBank.load(tmp_path / "b.bank", expect_owner="x")
    ctx = torch.tensor([7, 1, 4, 1, 5])
    for a, b in zip(bank.match_tokens(ctx, 5, 2), back.match_tokens(ctx, 5, 2)):
        assert torch.equal(a, b)
    assert back.match_tokens(ctx, 5, 2)[1][-1, 0] == 9  # "1 4 1 5" -> 9


def test_projected_shortlist_finds_the_exact_neighbours_of_low_rank_keys(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    # keys that live mostly in 6 directions, like hidden states (which are far from isotropic)
    keys = torch.randn(300, 6, generator=g) @ torch.randn(6, 32, generator=g) + 0.05 * torch.randn(300, 32, generator=g)
    tm = TokenMemory(32, capacity=400, shortlist_dim=8, basis_after=128)
    tm.add(keys[:100], torch.arange(100))
    assert tm._basis is None  # too few keys to fit directions yet
    tm.add(keys[100:], torch.arange(100, 300))
    assert tm._basis.shape == (32, 8)
    q = keys[:50] + 0.1 * torch.randn(50, 32, generator=g)
    sims, nxt = tm.search(q, 5)
    unit = torch.nn.functional.normalize
    exact = (unit(q) @ unit(keys[:299]).T).topk(5).indices + 1  # pair t predicts token t + 1
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nxt, exact)) / exact.numel()
    assert recall >= 0.95
    mb = MemoryBank(num_kv_heads=1, head_dim=4, chunk_size=2, capacity_tokens=400, token_dim=32)
    mb.tokens = tm
    mb.add(torch.randn(1, 1, 4), torch.randn(1, 1, 4), token_keys=keys[:1], token_ids=torch.tensor([7]))
    mb.save(tmp_path / "b.bank")
    back = MemoryBank.load(tmp_path / "b.bank")
    torch.testing.assert_close(back.tokens._basis, tm._basis)
    n = len(tm)
    assert torch.equal(back.tokens._proj[:n], tm._proj[:n])  # saved with the file, not recomputed
    for a, b in zip(tm.search(q, 5), back.search_tokens(q, 5)):
        torch.testing.assert_close(a, b)
    assert torch.equal(back.tokens._proj_scale[:n], tm._proj_scale[:n])
    # the int8 rows are the projections, one scale per key
    scale = tm._proj_scale[:n, None]
    err = tm._proj[:n].float() * scale - tm._keys[:n].float() @ tm._basis
    assert (err.abs() <= 0.5001 * scale).all()  # rounded to the nearest step of its own row
    assert (tm._proj[:n].abs().amax(1) == 127).all()  # each row uses the whole int8 range
    # a file written before the projection was saved: recomputed on load, to the same bits
    plain = TokenMemory.arrays
    monkeypatch.setattr(TokenMemory, "arrays", lambda self: {
        k: v for k, v in plain(self).items() if not k.startswith("token_proj")})
    mb.save(tmp_path / "old.bank")
    old = MemoryBank.load(tmp_path / "old.bank")
    assert torch.equal(old.tokens._proj[:n], tm._proj[:n])
    # a file written before int8 projections (bfloat16 ones): rounded to int8 on load
    bf16 = {k: v for k, v in plain(tm).items() if not k.startswith("token_proj")}
    bf16["token_proj"] = (tm._keys[:n].float() @ tm._basis).to(torch.bfloat16)
    monkeypatch.setattr(TokenMemory, "arrays", lambda self: {**{k: v for k, v in plain(self).items()
                                                                if not k.startswith("token_proj")},
                                                             "token_proj": bf16["token_proj"]})
    mb.save(tmp_path / "bf16.bank")
    monkeypatch.undo()
    was = MemoryBank.load(tmp_path / "bf16.bank")
    assert was.tokens._proj.dtype == torch.int8
    scale = was.tokens._proj_scale[:n, None]
    assert ((was.tokens._proj[:n].float() * scale - bf16["token_proj"].float()).abs() <= 0.5001 * scale).all()
    for a, b in zip(tm.search(q, 5), was.search_tokens(q, 5)):
        torch.testing.assert_close(a, b)
    tm.clear()
    assert tm._basis is None and len(tm) == 0


def test_ngram_hashes_short_path_equals_tensor_path():
    """Decoding hashes one n-gram in Python; it must equal the tensor loop's hash."""
    from longside.memory_bank.token_memory import _ngram_hashes

    seq = torch.randint(-1, 50000, (40,), generator=torch.Generator().manual_seed(0))
    for n in (2, 4, 8, 16, 32):
        whole = _ngram_hashes(seq, n)  # many n-grams: the tensor loop
        for L in (1, 2, 4):
            tail = seq[seq.shape[0] - (n + L - 1):]
            assert torch.equal(_ngram_hashes(tail, n), whole[-L:]), (n, L)


def test_ngram_hashes_from_half_equal_the_direct_hashes():
    """The match index builds each order's hashes from the half order's; they must equal the
    n-step loop's bit for bit (largest ids, the -1 of text[0], every length down to one n-gram)."""
    from longside.memory_bank.token_memory import _ngram_hashes

    g = torch.Generator().manual_seed(1)
    for length in (2, 3, 5, 33, 64, 500):
        seq = torch.randint(-1, 49152, (length,), generator=g)
        seq[0] = -1
        seq[-1] = 49151
        half = None
        for n in (2, 4, 8, 16, 32):
            if length < n:
                break
            direct = _ngram_hashes(seq, n)
            doubled = _ngram_hashes(seq, n, half) if half is not None else direct
            assert torch.equal(doubled, direct), (length, n)
            half = doubled


def test_sort_hashes_equals_a_stable_sort():
    """The match index's sort: equal hashes stay in time order, as torch's stable sort keeps them."""
    from longside.memory_bank.token_memory import _sort_hashes

    g = torch.Generator().manual_seed(2)
    for length, top in ((1, 5), (7, 3), (1000, 50), (20000, 2**31 - 1)):  # many ties, then almost none
        h = torch.randint(0, top, (length,), generator=g)
        vals, order = _sort_hashes(h)
        want_vals, want_order = torch.sort(h, stable=True)
        assert torch.equal(vals, want_vals) and torch.equal(order, want_order), length


def test_int8_shortlist_limits_and_nan_keys():
    """The int8 scores sum in 32-bit integers: a wider projection is refused with the limit in
    the message. A stored key with NaN gets a NaN scale, so no search returns it."""
    from longside.memory_bank.token_memory import MAX_SHORTLIST_DIM

    with pytest.raises(MemoryBankError, match=str(MAX_SHORTLIST_DIM)):
        TokenMemory(1024, capacity=8, shortlist_dim=MAX_SHORTLIST_DIM + 1)
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(300, 32, generator=g)
    keys[250, 3] = float("nan")
    tm = TokenMemory(32, capacity=400, shortlist_dim=8, basis_after=128)
    tm.add(keys[:200], torch.arange(200))  # the projection is fitted on these
    tm.add(keys[200:], torch.arange(200, 300))
    assert tm._proj_scale[:len(tm)].isnan().sum() == 1
    for q in (keys[250:251].nan_to_num(), keys[:8]):
        sims, nxt = tm.search(q, 5)
        assert torch.isfinite(sims).all() and 251 not in nxt.flatten().tolist()
