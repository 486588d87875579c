"""The one-call searches of a decode step (memory_bank/search_cpu.c) against torch's path."""

import numpy as np
import pytest
import torch
from longside.memory_bank import BatchMemory, MemoryBank, TokenMemory, search_cpu

pytestmark = pytest.mark.skipif(not search_cpu.available(), reason="the search library is not built")


@pytest.fixture(params=["vector", "scalar"])
def isa(request, monkeypatch):
    """Every path the machine has: the AVX2 one where it exists, and plain C."""
    if request.param == "vector" and search_cpu.isa() != "avx2":
        pytest.skip("no AVX2 here")
    if request.param == "scalar":
        monkeypatch.setenv("LONGSIDE_SEARCH_ISA", "scalar")
    return request.param


def _ranked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best of `scores [..., N]`, ties to the lower index: the order the
    library promises (torch's topk leaves ties unordered)."""
    idx = torch.arange(scores.shape[-1]).expand_as(scores)
    order = torch.sort(idx, dim=-1).indices  # stable sort by score below keeps index order
    by_score = torch.sort(scores.gather(-1, order), dim=-1, descending=True, stable=True).indices
    return order.gather(-1, by_score)[..., :k]


@pytest.mark.parametrize("tq,used", [(1, 3000), (3, 4219), (5, 37), (2, 9)])
def test_chunk_search_is_torch_topk(isa, tq, used):
    g = torch.Generator().manual_seed(tq)
    H, D, k, slots = 3, 64, 16, 5000
    keys = torch.randn(H, slots + 1, D, generator=g).half()
    q = torch.randn(H, tq, D, generator=g)
    got = search_cpu.search_chunks(q, keys, used, k, slots)
    scores = torch.bmm(q, keys[:, :used].float().transpose(1, 2))
    want = torch.full((H, tq, k), slots)
    kk = min(k, used)
    want[..., :kk] = _ranked(scores, kk)
    assert torch.equal(got, want)


def test_chunk_search_ties_go_to_the_lower_slot_and_freed_slots_never_return(isa):
    H, D, slots = 1, 8, 20
    keys = torch.zeros(H, slots + 1, D, dtype=torch.float16)
    keys[0, :6, 0] = torch.tensor([1.0, 2.0, 2.0, 3.0, 2.0, 3.0])  # equal scores: 1, 2, 4 and 3, 5
    q = torch.zeros(H, 1, D)
    q[0, 0, 0] = 1.0
    got = search_cpu.search_chunks(q, keys, 6, 5, slots)
    assert got[0, 0].tolist() == [3, 5, 1, 2, 4]
    got = search_cpu.search_chunks(q, keys, 6, 8, slots, freed=np.array([5, 2]))
    assert got[0, 0].tolist() == [3, 1, 4, 0, slots, slots, slots, slots]


def test_token_search_is_the_shortlist_then_the_exact_rescore(isa):
    """Keys and queries on a coarse grid make every product exact in any summation order, so
    the library must return exactly what the definition gives (many ties, all to the lower index)."""
    g = torch.Generator().manual_seed(0)
    N, dim, s, short, k = 700, 64, 16, 40, 10
    keys = (torch.randint(-4, 5, (N, dim), generator=g) / 8).to(torch.bfloat16)
    rows = (torch.randint(-4, 5, (N + 5, s), generator=g) / 8).to(torch.bfloat16)  # more rows than keys: unused
    q = torch.randint(-4, 5, (3, dim), generator=g) / 8
    qs = (torch.randint(-4, 5, (3, s), generator=g) / 8).to(torch.bfloat16)
    sims, idx = search_cpu.search_tokens(q, keys, qs, rows, short, k)
    approx = (qs.float() @ rows[:N].float().T).to(torch.bfloat16).float()
    cand = _ranked(approx, short)
    exact = torch.einsum("td,tkd->tk", q, keys[cand].float())
    # rank the candidates by exact score, ties to the lower key index
    order = cand.sort(dim=-1)
    pick = _ranked(exact.gather(-1, order.indices), k)
    want_idx = order.values.gather(-1, pick)
    assert torch.equal(idx, want_idx)
    assert torch.equal(sims, (q[:, None] * keys[want_idx].float()).sum(-1))


def test_token_search_over_int8_rows_scales_each_row(isa):
    """A decode step's one call over int8 projections: the raw query normalized and projected
    onto the basis, rounded to int16 (one scale, its largest magnitude / 32767), its integer
    products with each row summed exactly, times the row's scale and the query's; the
    shortlist rescored against the keys; the stored next tokens returned. Unit queries and
    grid values make every float step exact in any order, so the library must return exactly
    the definition (ties to the lower index); a wrong scale, a row read at the wrong stride or
    a sign lost in the int8 widening changes the shortlist."""
    g = torch.Generator().manual_seed(3)
    N, dim, s, short, k = 700, 64, 16, 40, 10
    keys = (torch.randint(-4, 5, (N, dim), generator=g) / 8).to(torch.bfloat16)
    rows = torch.randint(-127, 128, (N + 5, s), generator=g).to(torch.int8)  # more rows than keys: unused
    scale = 2.0 ** torch.randint(-9, -2, (N + 5,), generator=g).float()
    basis = torch.randint(-4, 5, (dim, s), generator=g) / 8
    next_ids = torch.randint(0, 50000, (N + 5,), generator=g)
    for t in range(3):
        q = torch.zeros(dim)  # four entries of +-0.5: norm exactly 1, so normalizing leaves it exact
        q[torch.randperm(dim, generator=g)[:4]] = 0.5 * (torch.randint(0, 2, (4,), generator=g) * 2 - 1)
        sims, nxt = search_cpu.token_search_step(q, keys, basis, rows, scale, next_ids, short, k)
        qs = (q @ basis)[None]
        xs = qs.abs().amax(1, keepdim=True) / 32767
        sums = torch.round(qs / xs).double() @ rows[:N].double().T  # exact integers
        cand = _ranked(sums.float() * (scale[:N] * xs), short)
        exact = torch.einsum("td,tkd->tk", q[None], keys[cand].float())
        order = cand.sort(dim=-1)
        want_idx = order.values.gather(-1, _ranked(exact.gather(-1, order.indices), k))
        assert torch.equal(nxt, next_ids[want_idx])
        assert torch.equal(sims, (q * keys[want_idx].float()).sum(-1))
    with pytest.raises(ValueError, match="unexpected shapes"):
        search_cpu.token_search_step(q, keys, basis, rows, scale.double(), next_ids, short, k)  # scales are float32


def test_token_memory_search_of_one_query_equals_torch_path(isa, monkeypatch):
    """Through TokenMemory, with and without the projection shortlist: one C call or torch's
    operations. Keys of rank 24 (the projection keeps them whole) whose best neighbours stand
    clear of the shortlist's cut, so the two agree whatever their summation order."""
    g = torch.Generator().manual_seed(1)
    dim, rank = 96, 24
    mix = torch.linalg.qr(torch.randn(dim, rank, generator=g))[0].T  # [rank, dim] orthonormal rows
    keys = torch.randn(5000, rank, generator=g) @ mix
    queries = torch.randn(12, rank, generator=g) @ mix
    for size, basis_after in ((5000, 1000), (300, 4096)):  # projected shortlist, then plain bfloat16
        tm = TokenMemory(dim, capacity=8000, shortlist_dim=32, basis_after=basis_after)
        tm.add(keys[:size], torch.arange(size))
        assert (tm._basis is not None) == (size >= basis_after)
        got = [tm.search(queries[i:i + 1], 16) for i in range(12)]
        monkeypatch.setenv("LONGSIDE_SEARCH_ISA", "off")
        want = [tm.search(queries[i:i + 1], 16) for i in range(12)]
        monkeypatch.setenv("LONGSIDE_SEARCH_ISA", "scalar" if isa == "scalar" else "avx2")
        for (gs, gn), (ws, wn) in zip(got, want):
            torch.testing.assert_close(gs, ws, atol=1e-6, rtol=0)
            assert gn.tolist() == wn.tolist()


def test_bank_search_of_one_query_token_equals_torch_path(isa, monkeypatch):
    g = torch.Generator().manual_seed(2)
    bank = MemoryBank(num_kv_heads=3, head_dim=64, capacity_tokens=4096, chunk_size=4, dtype=torch.float16,
                      eviction="keep-most-retrieved")
    for _ in range(3):  # past capacity: evicted slots are reused out of order
        kv = torch.randn(1999, 3, 64, generator=g)
        bank.add(kv, kv.flip(0))
        bank.search(torch.randn(40, 9, 64, generator=g), 16)  # retrievals steer the eviction
    q = torch.randn(1, 9, 64, generator=g)
    hits = bank._hits.clone()
    got = bank.search(q, 16)
    monkeypatch.setenv("LONGSIDE_SEARCH_ISA", "off")
    counted = bank._hits.clone()
    want = bank.search(q, 16)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(bank._hits - counted, counted - hits)  # both count the same hits
    assert (bank._hits - counted).sum() == 9 * 16
    batch = BatchMemory.of([bank, bank])  # a padding row (not counted) and a real one
    for mode in ("scalar" if isa == "scalar" else "avx2", "off"):
        monkeypatch.setenv("LONGSIDE_SEARCH_ISA", mode)
        before = bank._hits.clone()
        out = batch.search(torch.cat([q, q])[:, None], 16, counted=torch.tensor([[False], [True]]))
        assert torch.equal(out[0][0], want[0]) and torch.equal(out[2][1], want[2])
        assert torch.equal(bank._hits - before, counted - hits)


def test_bank_search_of_many_query_tokens_reads_in_c_as_torch(isa, monkeypatch):
    """A prompt's search (many query tokens): the scan in one C call and the reading in
    another, on both threads; slots, keys, values, mask and hit counts equal torch's
    product + top-k and reading."""
    g = torch.Generator().manual_seed(5)
    bank = MemoryBank(num_kv_heads=3, head_dim=64, capacity_tokens=4096, chunk_size=4, dtype=torch.float16)
    kv = torch.randn(3001, 3, 64, generator=g)  # a partial last chunk
    bank.add(kv, kv.flip(0))
    q = torch.randn(37, 9, 64, generator=g)
    counted = torch.rand(37, generator=g) < 0.7
    hits = bank._hits.clone()
    calls, scans = [], []
    read, scan = search_cpu.read_chunks, search_cpu.search_chunks
    monkeypatch.setattr(search_cpu, "read_chunks", lambda *a: calls.append(a[1]) or read(*a))
    monkeypatch.setattr(search_cpu, "search_chunks", lambda *a: scans.append(a[0].shape[1]) or scan(*a))
    got = bank.search(q, 16)
    assert calls == [37] and scans == [37 * 3]  # both C calls ran, for the 37 tokens at once
    monkeypatch.setenv("LONGSIDE_SEARCH_ISA", "off")
    mid = bank._hits.clone()
    want = bank.search(q, 16)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(mid - hits, bank._hits - mid) and (mid - hits).sum() == 37 * 9 * 16
    batch = BatchMemory.of([bank])
    for mode in (isa, "off"):
        monkeypatch.setenv("LONGSIDE_SEARCH_ISA", mode)
        before = bank._hits.clone()
        batch.search(q[None], 16, counted=counted[None])
        assert (bank._hits - before).sum() == int(counted.sum()) * 9 * 16


def test_token_search_on_both_threads_and_with_nan_scores(isa):
    """A scan large enough for both threads (each its own heap, merged) gives what one thread
    gives; a query whose scores are NaN gets a row padded as the batch pads rows."""
    g = torch.Generator().manual_seed(4)
    N, dim, s = 40000, 32, 16  # 40000 x 16 products: past the threads' threshold
    keys = (torch.randint(-4, 5, (N, dim), generator=g) / 8).to(torch.bfloat16)
    rows = (torch.randint(-4, 5, (N, s), generator=g) / 8).to(torch.bfloat16)
    q = torch.randint(-4, 5, (2, dim), generator=g) / 8
    qs = (torch.randint(-4, 5, (2, s), generator=g) / 8).to(torch.bfloat16)
    got = search_cpu.search_tokens(q, keys, qs, rows, 100, 20)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = search_cpu.search_tokens(q, keys, qs, rows, 100, 20)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], alone[0]) and torch.equal(got[1], alone[1])
    nan = torch.full((1, dim), float("nan"))  # a NaN query: its projection is NaN too
    nan = search_cpu.search_tokens(nan, keys, nan[:, :s].to(torch.bfloat16), rows, 100, 20)
    assert torch.equal(nan[0], torch.full((1, 20), float("-inf"))) and torch.equal(nan[1], torch.zeros(1, 20, dtype=torch.int64))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="float16"):
        search_cpu.search_chunks(torch.zeros(1, 1, 8), torch.zeros(1, 4, 8), 4, 2, 4)
    keys = torch.zeros(10, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="shortlist"):
        search_cpu.search_tokens(torch.zeros(1, 8), keys, torch.zeros(1, 8, dtype=torch.bfloat16), keys, 20, 5)
    with pytest.raises(ValueError, match="k >= 1"):
        search_cpu.search_chunks(torch.zeros(1, 1, 8), torch.zeros(1, 4, 8, dtype=torch.float16), 4, 0, 4)
    with pytest.raises(ValueError, match="used"):
        search_cpu.search_chunks(torch.zeros(1, 1, 8), torch.zeros(1, 4, 8, dtype=torch.float16), 5, 2, 4)
    with pytest.raises(ValueError, match="dim"):
        search_cpu.search_tokens(torch.zeros(1, 4), keys, torch.zeros(1, 8, dtype=torch.bfloat16), keys, 5, 5)


def test_exact_match_of_the_last_position_equals_torch_path(monkeypatch):
    """Text drawn from few tokens repeats itself everywhere: many candidates, long matches,
    matches running back into text[0] and a full ring."""
    if search_cpu.isa() != "avx2":
        pytest.skip("no AVX2 here: the one-call path is not taken")
    g = torch.Generator().manual_seed(3)
    for capacity, n in ((4000, 3000), (500, 3000), (4000, 40)):
        tm = TokenMemory(4, capacity=capacity, dtype=torch.float32)
        text = torch.randint(0, 3, (n,), generator=g)
        tm.add(torch.randn(n, 4, generator=g), text)
        for c in (1, 2, 7, 90):
            for _ in range(5):
                if n > c and torch.rand(1, generator=g).item() < 0.5:  # continues an earlier passage
                    start = int(torch.randint(0, n - c, (1,), generator=g))
                    context = text[start:start + c].clone()
                else:
                    context = torch.randint(0, 3, (c,), generator=g)
                monkeypatch.setenv("LONGSIDE_SEARCH_ISA", "avx2")
                got = tm.match(context, 1, 16)
                monkeypatch.setenv("LONGSIDE_SEARCH_ISA", "off")
                want = tm.match(context, 1, 16)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                assert want[0].max() > 0 or c == 1
