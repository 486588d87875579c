import pytest
import torch

from longside.errors import MemoryBankError
from longside.memory_bank import BatchMemory, MemoryBank, TokenMemory


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
