"""Tests of longside.memory_bank: retrieval, chunking, masks, eviction, batches, files, threads."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from longside.memory_bank import FIFO, BatchMemory, KeepMostRetrieved, MemoryBank
from longside.memory_bank.eviction import SlotQueue

from longside.errors import MemoryBankError


def tagged(first: int, n: int, heads: int = 2, dim: int = 8) -> torch.Tensor:
    """`[n, heads, dim]` float32 keys whose dim 0 holds the token's stream index and
    dim 1 its head, the rest noise (so tests can tell which token came back)."""
    g = torch.Generator().manual_seed(first)
    x = torch.randn(n, heads, dim, generator=g)
    x[..., 0] = torch.arange(first, first + n, dtype=torch.float32).view(n, 1)
    x[..., 1] = torch.arange(heads, dtype=torch.float32).view(1, heads)
    return x


def stored_tokens(bank: MemoryBank) -> list[list[int]]:
    """The bank's chunks, oldest first, as lists of token indices (from tagged keys)."""
    out = []
    for slot in bank._queue.items():
        fill = int(bank._fill[slot])
        out.append([int(t) for t in bank._keys[0, slot, :fill, 0].float().round()])
    return out


def brute_force_scores(chunks_k: list[torch.Tensor], queries: torch.Tensor, n_kv: int, k: int) -> torch.Tensor:
    """Reference: `[T, H_q, min(k, n)]` best chunk scores, float64, from chunk token keys."""
    means = torch.stack([c.double().mean(0) for c in chunks_k])  # [n, H_kv, D]
    g = queries.shape[1] // n_kv
    heads = torch.arange(queries.shape[1]) // g
    scores = torch.einsum("thd,nhd->thn", queries.double(), means[:, heads])
    return scores.topk(min(k, len(chunks_k)), dim=-1).values


# -- retrieval ---------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(n_tokens=st.integers(1, 70), chunk=st.sampled_from([1, 2, 3, 4]), k=st.integers(1, 6),
       group=st.sampled_from([1, 3]), seed=st.integers(0, 10_000))
def test_flat_topk_matches_brute_force(n_tokens, chunk, k, group, seed):
    torch.manual_seed(seed)
    n_kv, D = 2, 8
    bank = MemoryBank(n_kv, D, chunk_size=chunk, capacity_tokens=256, dtype=torch.float32)
    keys = torch.randn(n_tokens, n_kv, D)
    bank.add(keys, -keys)
    q = torch.randn(5, n_kv * group, D)
    out_k, out_v, mask = bank.search(q, k)
    assert out_k.shape == (5, n_kv * group, k * chunk, D) and out_k.dtype == torch.float32
    chunks = [keys[i:i + chunk] for i in range(0, n_tokens, chunk)]
    want = brute_force_scores(chunks, q, n_kv, k)
    # score each returned chunk from its returned tokens, honouring the mask
    blocks = out_k.view(5, n_kv * group, k, chunk, D).double()
    m = mask.view(5, n_kv * group, k, chunk).double()
    fill = m.sum(-1)
    got_valid = fill > 0
    means = (blocks * m.unsqueeze(-1)).sum(-2) / fill.clamp(min=1).unsqueeze(-1)
    got = torch.einsum("thkd,thd->thk", means, q.double())
    n_ret = want.shape[-1]
    assert got_valid[..., :n_ret].all() and not got_valid[..., n_ret:].any()
    torch.testing.assert_close(got[..., :n_ret], want, atol=1e-4, rtol=1e-4)
    # values come from the same chunks as keys; masked slots are zeros
    torch.testing.assert_close(out_v, -out_k)
    assert (out_k[~mask] == 0).all() and (out_v[~mask] == 0).all()


def test_partial_chunk_is_searchable_and_masked():
    bank = MemoryBank(2, 8, chunk_size=4, capacity_tokens=64, dtype=torch.float32)
    bank.add(tagged(0, 6), tagged(0, 6))
    assert len(bank) == 6 and bank.num_chunks == 2
    assert stored_tokens(bank) == [[0, 1, 2, 3], [4, 5]]
    # a query aimed at the newest token finds the partial chunk, with its 2 real tokens
    q = torch.zeros(1, 2, 8)
    q[..., 0] = 1.0
    k, _, mask = bank.search(q, 1)
    assert mask[0, 0].tolist() == [True, True, False, False]
    assert k[0, 0, :2, 0].tolist() == [4.0, 5.0] and (k[0, 0, 2:] == 0).all()
    # topping up fills the partial chunk in place and refreshes its key
    bank.add(tagged(6, 3), tagged(6, 3))
    assert stored_tokens(bank) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert torch.allclose(bank._chunk_keys[0, bank._queue.items()[1]].float(), torch.cat([tagged(0, 6)[4:], tagged(6, 3)[:2]])[:, 0].mean(0))


def test_chunk_key_last_uses_the_newest_token():
    bank = MemoryBank(2, 8, chunk_size=4, capacity_tokens=64, dtype=torch.float32, chunk_key="last")
    keys = tagged(0, 6)
    bank.add(keys, keys)
    slots = bank._queue.items()
    assert torch.equal(bank._chunk_keys[:, slots[0]], keys[3])
    assert torch.equal(bank._chunk_keys[:, slots[1]], keys[5])  # partial chunk: its last token so far


def test_empty_and_part_full_bank_give_masked_zeros():
    bank = MemoryBank(2, 8, chunk_size=2, capacity_tokens=32)
    k, v, mask = bank.search(torch.randn(3, 4, 8), 5)
    assert not mask.any() and (k == 0).all() and (v == 0).all()
    bank.add(tagged(0, 3), tagged(0, 3))  # one full chunk, one partial: 3 of 10 slots real
    k, v, mask = bank.search(torch.randn(3, 4, 8), 5)
    assert (mask.sum(-1) == 3).all()
    assert (k[~mask] == 0).all() and (v[~mask] == 0).all() and torch.isfinite(k).all()


def test_query_heads_read_their_kv_head():
    bank = MemoryBank(3, 8, chunk_size=2, capacity_tokens=32, dtype=torch.float32)
    bank.add(tagged(0, 8, heads=3), tagged(0, 8, heads=3))
    k, _, mask = bank.search(torch.randn(4, 9, 8), 2)
    # dim 1 of every returned key is the kv head it came from: h // 3
    assert mask.all()
    assert torch.equal(k[..., 1], (torch.arange(9) // 3).float().view(1, 9, 1).expand(4, 9, 4))


def test_bad_input_raises_clear_errors():
    bank = MemoryBank(3, 8)
    with pytest.raises(MemoryBankError, match=r"\[T, 3, 8\]"):
        bank.add(torch.randn(4, 2, 8), torch.randn(4, 2, 8))
    with pytest.raises(MemoryBankError, match="query heads"):
        bank.search(torch.randn(4, 4, 8), 2)
    with pytest.raises(MemoryBankError, match="k_chunks"):
        bank.search(torch.randn(4, 3, 8), 0)
    with pytest.raises(MemoryBankError, match="unknown index"):
        MemoryBank(3, 8, index="lsh")


# -- chunking and eviction against a reference model -----------------------------------------

def reference_fifo(adds: list[int], chunk: int, cap_chunks: int) -> list[list[int]]:
    """Pure-Python model of the bank's FIFO chunking: chunks of token indices, oldest first."""
    chunks: list[list[int]] = []
    t = 0
    for n in adds:
        toks = list(range(t, t + n))
        t += n
        if chunks and len(chunks[-1]) < chunk:
            take = chunk - len(chunks[-1])
            chunks[-1] += toks[:take]
            toks = toks[take:]
        new = [toks[i:i + chunk] for i in range(0, len(toks), chunk)]
        chunks += new[-cap_chunks:]
        del chunks[:max(0, len(chunks) - cap_chunks)]
    return chunks


@settings(max_examples=40, deadline=None)
@given(adds=st.lists(st.integers(0, 13), min_size=1, max_size=12), chunk=st.sampled_from([1, 2, 4]),
       cap_chunks=st.integers(1, 6))
def test_chunking_and_fifo_eviction_match_reference(adds, chunk, cap_chunks):
    bank = MemoryBank(2, 8, chunk_size=chunk, capacity_tokens=cap_chunks * chunk, dtype=torch.float32)
    t = 0
    for n in adds:
        bank.add(tagged(t, n), tagged(t, n))
        t += n
    want = reference_fifo(adds, chunk, cap_chunks)
    assert stored_tokens(bank) == want
    assert len(bank) == sum(map(len, want)) and bank.num_chunks == len(want)
    # nothing evicted is ever returned: every returned token is one the bank holds
    k, _, mask = bank.search(torch.randn(2, 2, 8), cap_chunks)
    held = {tok for c in want for tok in c}
    assert {int(x) for x in k[..., 0][mask].round()} <= held


def test_keep_most_retrieved_spares_retrieved_chunks():
    bank = MemoryBank(2, 8, chunk_size=1, capacity_tokens=8, dtype=torch.float32,
                      eviction=KeepMostRetrieved(lookahead=4))
    keys = tagged(0, 8)
    bank.add(keys, keys)
    # retrieve token 1 (second oldest) a few times: exact match query
    for _ in range(3):
        bank.search(keys[1:2].repeat(1, 1, 1) * 10, 1)
    bank.add(tagged(8, 2), tagged(8, 2))  # must evict 2 of the 4*2=8 oldest
    kept = [c[0] for c in stored_tokens(bank)]
    assert 1 in kept and 0 not in kept
    assert sorted(kept) == [1, 3, 4, 5, 6, 7, 8, 9]  # 0 and 2: never retrieved, oldest


class CountingPolicy(FIFO):
    """FIFO that records how many chunks each eviction looked at."""

    def __init__(self):
        self.looked: list[int] = []

    def choose(self, hits, n):
        self.looked.append(len(hits))
        return super().choose(hits, n)


class SpyQueue(SlotQueue):
    def __init__(self, capacity):
        super().__init__(capacity)
        self.popped: list[int] = []

    def pop(self, n):
        out = super().pop(n)
        self.popped.append(len(out))
        return out


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_eviction_cost_grows_with_evicted_not_with_bank(index):
    """Evicting one 64-token segment touches 16 chunks whether the bank holds 256 or 4096."""
    touched = {}
    for cap in (1024, 16384):
        policy = CountingPolicy()
        bank = MemoryBank(2, 8, chunk_size=4, capacity_tokens=cap, index=index, eviction=policy,
                          nlist=4, train_min_chunks=64)
        bank._queue = SpyQueue(bank.capacity_chunks)
        removed: list[int] = []
        keys = torch.randn(cap, 2, 8)
        bank.add(keys, keys)  # full
        if bank._ivf is not None:
            orig = bank._ivf.remove
            bank._ivf.remove = lambda s: (removed.append(len(s)), orig(s))[1]
            assert bank._ivf.ntotal == bank.num_chunks
        bank.add(keys[:64], keys[:64])
        touched[cap] = (policy.looked, bank._queue.popped, removed)
        assert bank.num_chunks == bank.capacity_chunks
        if bank._ivf is not None:
            assert bank._ivf.ntotal == bank.num_chunks
    assert touched[1024] == touched[16384]
    assert touched[1024][0] == [16] and touched[1024][1] == [16]


def test_clear_forgets_everything():
    bank = MemoryBank(2, 8, capacity_tokens=64)
    bank.add(tagged(0, 30), tagged(0, 30))
    bank.clear()
    assert len(bank) == 0 and bank.num_chunks == 0
    assert not bank.search(torch.randn(2, 2, 8), 3)[2].any()
    bank.add(tagged(100, 5), tagged(100, 5))
    assert stored_tokens(bank) == [[100, 101, 102, 103], [104]]


# -- approximate indexes -----------------------------------------------------------------------

def clustered(n: int, heads: int, dim: int, seed: int = 0, centers: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, heads, dim, generator=g) * 3
    return c[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, heads, dim, generator=g)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_ivf_recall_against_flat(index):
    keys = clustered(8192, 2, 16)
    flat = MemoryBank(2, 16, capacity_tokens=8192, dtype=torch.float32)
    approx = MemoryBank(2, 16, capacity_tokens=8192, index=index, dtype=torch.float32, nlist=32, nprobe=8)
    for bank in (flat, approx):
        for a in range(0, 8192, 1024):
            bank.add(keys[a:a + 1024], keys[a:a + 1024])
    assert approx.stats()["trained"] and approx._ivf.ntotal == approx.num_chunks
    q = clustered(64, 6, 16, seed=1)[:, :, :]  # 6 query heads over 2 kv heads
    fk, _, fm = flat.search(q, 8)
    ak, _, am = approx.search(q, 8)
    assert am.all()
    # recall: share of flat's chunks (identified by their first token) that approx found
    f_ids = fk.view(64, 6, 8, 4, 16)[:, :, :, 0, :4]
    a_ids = ak.view(64, 6, 8, 4, 16)[:, :, :, 0, :4]
    hit = (f_ids.unsqueeze(3) == a_ids.unsqueeze(2)).all(-1).any(-1).float().mean()
    assert hit >= 0.9


def test_ivf_searches_exactly_before_training():
    keys = torch.randn(40, 2, 8)
    flat = MemoryBank(2, 8, capacity_tokens=1024, dtype=torch.float32)
    ivf = MemoryBank(2, 8, capacity_tokens=1024, index="ivf", dtype=torch.float32, nlist=16)
    for b in (flat, ivf):
        b.add(keys, keys)
    assert not ivf.stats()["trained"]
    q = torch.randn(3, 2, 8)
    assert torch.equal(flat.search(q, 4)[0], ivf.search(q, 4)[0])


# -- batches -----------------------------------------------------------------------------------

def test_batch_rows_never_read_each_other():
    mem = BatchMemory(3, num_kv_heads=2, head_dim=8, chunk_size=2, capacity_tokens=32, dtype=torch.float32)
    keys = torch.stack([tagged(1000 * b, 10) for b in range(3)])  # row b: tokens 1000b..
    mem.add(keys, keys)
    k, v, mask = mem.search(torch.randn(3, 4, 2, 8), 16)
    assert k.shape == (3, 4, 2, 32, 8) and mask.shape == (3, 4, 2, 32)
    for b in range(3):
        toks = k[b][..., 0][mask[b]]
        assert ((toks >= 1000 * b) & (toks < 1000 * b + 10)).all()
        assert mask[b].sum(-1).eq(10).all()
    mem.reset([1])
    assert mem.lengths() == [10, 0, 10]
    assert not mem.search(torch.randn(3, 4, 2, 8), 2)[2][1].any()
    mem.reset(torch.tensor([True, False, False]))
    assert mem.lengths() == [0, 0, 10]


def test_batch_search_of_named_rows_reads_those_banks():
    mem = BatchMemory(3, num_kv_heads=2, head_dim=8, chunk_size=2, capacity_tokens=32, dtype=torch.float32)
    mem.add(torch.stack([tagged(1000 * b, 10) for b in range(3)]), torch.stack([tagged(1000 * b, 10) for b in range(3)]))
    q = torch.randn(2, 4, 2, 8)
    k, v, mask = mem.search(q, 3, rows=[2, 0])  # batch row 0 reads bank 2, row 1 bank 0
    for b, r in enumerate([2, 0]):
        want = mem[r].search(q[b], 3)
        for got, w in zip((k[b], v[b], mask[b]), want):
            assert torch.equal(got, w)
    with pytest.raises(MemoryBankError, match=r"must be \[B=1, T, H, D\], got \(2, 4, 2, 8\)"):
        mem.search(q, 3, rows=[1])


# -- files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_save_load_round_trip(tmp_path, index):
    bank = MemoryBank(2, 8, chunk_size=4, capacity_tokens=512, index=index, owner="m:abc:layer3",
                      nlist=4, train_min_chunks=40, eviction="keep-most-retrieved")
    keys = clustered(600, 2, 8)
    bank.add(keys[:598], keys[:598] * 2)  # wraps past capacity, leaves a partial chunk
    q = torch.randn(5, 4, 8)
    bank.search(q, 3)
    bank.save(tmp_path / "m.lsmb")
    back = MemoryBank.load(tmp_path / "m.lsmb", expect_owner="m:abc:layer3")
    assert back.stats() == bank.stats()
    assert stored_tokens(back) == stored_tokens(bank)
    for a, b in zip(back.search(q, 5), bank.search(q, 5)):
        assert torch.equal(a, b)
    # both keep working identically after the round trip
    for b in (bank, back):
        b.add(keys[598:], keys[598:] * 2)
    assert torch.equal(back.search(q, 5)[0], bank.search(q, 5)[0])
    assert torch.equal(back._hits, bank._hits)


def test_load_refuses_a_foreign_bank(tmp_path):
    bank = MemoryBank(2, 8, owner="smollm2-135m:aaa:layer15")
    bank.add(tagged(0, 9), tagged(0, 9))
    bank.save(tmp_path / "m.lsmb")
    with pytest.raises(MemoryBankError, match="gemma3-270m:bbb:layer9"):
        MemoryBank.load(tmp_path / "m.lsmb", expect_owner="gemma3-270m:bbb:layer9")
    assert len(MemoryBank.load(tmp_path / "m.lsmb")) == 9  # no expectation: accepted


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupt_or_truncated_file_is_refused(tmp_path, damage):
    bank = MemoryBank(2, 8)
    bank.add(tagged(0, 40), tagged(0, 40))
    path = tmp_path / "m.lsmb"
    bank.save(path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(MemoryBankError, match="truncated, corrupt"):
        MemoryBank.load(path)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.lsmb"
    bank = MemoryBank(2, 8)
    bank.add(tagged(0, 12), tagged(0, 12))
    bank.save(path)
    good = path.read_bytes()
    bank.add(tagged(12, 12), tagged(12, 12))

    from longside.memory_bank import persist

    def boom(_t):  # crash half-way through writing the arrays
        raise OSError("disk full")

    monkeypatch.setattr(persist, "_raw", boom)
    with pytest.raises(OSError):
        bank.save(path)
    assert path.read_bytes() == good
    assert len(MemoryBank.load(path)) == 12
    assert [p.name for p in tmp_path.iterdir()] == ["m.lsmb"]  # no temp file left


def test_missing_file_says_so(tmp_path):
    with pytest.raises(MemoryBankError, match="no memory bank"):
        MemoryBank.load(tmp_path / "nope.lsmb")


# -- threads -----------------------------------------------------------------------------------

def test_search_during_add_sees_whole_adds_only():
    """A writer adds 24-token segments while a reader searches: every search must see a
    whole number of segments (an add is atomic), and nothing may fail."""
    seg, n_seg = 24, 60
    bank = MemoryBank(2, 8, chunk_size=4, capacity_tokens=seg * n_seg, dtype=torch.float32)
    errors: list[BaseException] = []
    seen: list[int] = []

    def writer():
        try:
            for s in range(n_seg):
                bank.add(tagged(s * seg, seg), tagged(s * seg, seg))
        except BaseException as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    q = torch.randn(2, 2, 8)
    while t.is_alive() or not seen:
        _, _, mask = bank.search(q, bank.capacity_chunks)
        n = int(mask[0, 0].sum())
        assert bool((mask.sum(-1) == n).all())
        seen.append(n)
    t.join()
    assert not errors
    assert all(n % seg == 0 for n in seen)
    assert len(bank) == seg * n_seg


def test_search_waits_for_an_add_in_progress():
    """Pause an add half-way (after its slots are taken, before their search keys are
    written): a search started meanwhile must block, then see the whole add."""
    bank = MemoryBank(2, 8, chunk_size=4, capacity_tokens=256, dtype=torch.float32)
    bank.add(tagged(0, 16), tagged(0, 16))
    in_add, release = threading.Event(), threading.Event()
    compute = bank._compute_chunk_keys

    def paused(idx):
        in_add.set()
        release.wait(10)
        return compute(idx)

    bank._compute_chunk_keys = paused
    writer = threading.Thread(target=bank.add, args=(tagged(16, 16), tagged(16, 16)))
    writer.start()
    assert in_add.wait(10)
    found: list[torch.Tensor] = []
    reader = threading.Thread(target=lambda: found.extend(bank.search(torch.randn(2, 2, 8), 64)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive(), "search ran while an add was half-done"
    release.set()
    writer.join(10)
    reader.join(10)
    k, _, mask = found
    assert (mask.sum(-1) == 32).all()
    assert sorted(int(t) for t in k[0, 0, :, 0][mask[0, 0]].round()) == list(range(32))


def test_non_finite_keys_or_values_are_refused():
    """A NaN key would be retrieved first by every query; a float32 key beyond float16's
    range becomes inf in storage. Both are refused and the bank is left as it was."""
    bank = MemoryBank(num_kv_heads=2, head_dim=8, chunk_size=2, capacity_tokens=64)
    bank.add(tagged(0, 4), tagged(0, 4))
    for bad_k, bad_v in [(float("nan"), 0.0), (0.0, float("inf")), (1e6, 0.0)]:
        k, v = tagged(4, 2), tagged(4, 2)
        k[0, 0, 3] += bad_k
        v[1, 1, 2] += bad_v
        with pytest.raises(MemoryBankError, match="NaN or inf"):
            bank.add(k, v)
    assert len(bank) == 4 and stored_tokens(bank) == [[0, 1], [2, 3]]


def test_bad_k_and_rows_are_refused():
    batch = BatchMemory(2, num_kv_heads=2, head_dim=8, chunk_size=2, capacity_tokens=64, token_dim=4)
    q = torch.randn(2, 3, 4, 8)
    for k in (0, -1, 1.5):
        with pytest.raises(MemoryBankError, match="k_chunks"):
            batch.search(q, k)
        with pytest.raises(MemoryBankError, match="k must be"):
            batch.banks[0].search_tokens(torch.randn(3, 4), k)
    for r in (2, -1):
        with pytest.raises(MemoryBankError, match="out of range"):
            batch[r]
        with pytest.raises(MemoryBankError, match="out of range"):
            batch.search(q[:1], 1, rows=[r])


def test_an_ivf_index_that_does_not_list_the_chunks_is_refused(tmp_path):
    """A saved IVF index (e.g. a forged file with a recomputed checksum) must hold exactly
    the bank's live chunks: search results are read as slots."""
    import numpy as np

    bank = MemoryBank(2, 8, chunk_size=2, capacity_tokens=512, index="ivf", nlist=4, train_min_chunks=32)
    bank.add(tagged(0, 200), tagged(0, 200))
    assert bank.stats()["trained"]
    bank.save(tmp_path / "ok.lsmb")
    assert MemoryBank.load(tmp_path / "ok.lsmb").num_chunks == bank.num_chunks
    bank._ivf.remove(np.array([int(bank._queue.items()[0])]))  # head lists lose one chunk
    bank.save(tmp_path / "bad.lsmb")
    with pytest.raises(MemoryBankError, match="does not list"):
        MemoryBank.load(tmp_path / "bad.lsmb")


def test_sink_tokens_go_to_the_token_memory_only():
    """`sinks`: the first tokens of a write are left out of the chunks (attention sinks),
    not out of the token memory; a write of sinks only adds no chunk."""
    banks = [MemoryBank(2, 8, chunk_size=4, capacity_tokens=64, dtype=torch.float32, token_dim=4) for _ in range(2)]
    tk = torch.randn(13, 4)
    for bank, sinks in zip(banks, (4, 0)):
        bank.add(tagged(0, 10), tagged(0, 10), token_keys=tk[:10], token_ids=torch.arange(10), sinks=sinks)
        bank.add(tagged(10, 3), tagged(10, 3), token_keys=tk[10:], token_ids=torch.arange(10, 13), sinks=sinks)
    assert len(banks[0]) == 6 and stored_tokens(banks[0]) == [[4, 5, 6, 7], [8, 9]]
    assert len(banks[1]) == 13
    assert len(banks[0].tokens) == len(banks[1].tokens) > 0  # the token memory took every token
    for bad in (-1, 1.5, True):
        with pytest.raises(MemoryBankError, match="sinks"):
            banks[0].add(tagged(20, 2), tagged(20, 2), token_keys=tk[:2], token_ids=torch.arange(2), sinks=bad)
    assert len(banks[0]) == 6 and len(banks[0].tokens) == len(banks[1].tokens)
