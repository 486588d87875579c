"""Rows of different lengths decoding together (`RaggedWindows`): each row's logits equal
those of its own `LocalWindow`, across segment boundaries, with rows joining and leaving.
Real SmolLM2 backbone; a 24-token window and a perturbed side network so every read path
(memory attention, side blocks, token cache) moves the logits."""

from __future__ import annotations

import pytest
import torch

from longside.config import SideNetConfig
from longside.errors import LongsideError
from longside.inference.ragged import RaggedWindows
from longside.inference.window import LocalWindow
from longside.memory import Memory
from longside.model import LongSideModel

W = 24
TEXTS = ["The lighthouse keeper on Skerry Rock kept a ledger of every ship that passed. " * 3,
         "Marta grew tomatoes, basil and three kinds of beans in her allotment by the canal. " * 3,
         "The quartet rehearsed the slow movement twice before the cellist broke a string. " * 3,
         "A sudden squall drove the fishing boats back into the harbour before noon. " * 3]


@pytest.fixture(scope="module")
def model(smollm2):
    model = LongSideModel(smollm2, SideNetConfig(window=W, capacity_tokens=4096))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (model.side.up.weight, model.side.reader.q_delta.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.side.final_gate.fill_(2.0)
    return model.eval()


def _memory(model, text: str) -> Memory:
    mem = Memory(model.backbone, model.config, 1)
    mem.memorize(text, progress=False, as_text=True)
    return mem


def _window(model, text: str, prompt_len: int):
    """A fed window and an identical twin (same memory text, same prompt) as the reference."""
    ids = torch.randint(0, 2000, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    out = []
    for _ in range(2):
        win = LocalWindow(model, 1, memory=_memory(model, text))
        win.feed(ids)
        out.append(win)
    return out


def test_rows_of_different_lengths_step_like_their_own_windows(model):
    gen = torch.Generator().manual_seed(1)
    pairs = [_window(model, t, n) for t, n in zip(TEXTS[:3], (20, 5, 11))]
    ragged = RaggedWindows(model)
    assert ragged.batched
    for win, _ in pairs:
        ragged.join(win)
    refs = [ref for _, ref in pairs]
    for step in range(40):  # every row crosses at least one segment boundary
        if step == 13:  # a row leaves: its window goes on alone, exactly where it was
            alone = ragged.leave(1)
            ref_alone = refs.pop(1)
        if step == 17:  # another joins mid-segment
            win, ref = _window(model, TEXTS[3], 9)
            ragged.join(win)
            refs.append(ref)
        ids = torch.randint(0, 2000, (len(refs),), generator=gen)
        got = ragged.step(ids)
        want = torch.cat([ref.feed(ids[b:b + 1, None]) for b, ref in enumerate(refs)])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        if step >= 13:
            t = ids[:1, None]
            torch.testing.assert_close(alone.feed(t), ref_alone.feed(t), atol=2e-4, rtol=1e-4)
    # segments moved into each row's own memory, as its own window would have moved them
    for row, ref in zip(ragged.rows, refs):
        assert row.segments_written == ref.segments_written >= 1
        assert len(row.memory.banks[0]) == len(ref.memory.banks[0])
    # rows hand their state back intact
    back = ragged.leave(0)
    t = torch.tensor([[7]])
    torch.testing.assert_close(back.feed(t), refs[0].feed(t), atol=2e-4, rtol=1e-4)


def test_rows_grow_their_per_token_tensors_in_place(model):
    """A step writes each row's new id, memory keys/values and token-cache key into buffers
    with room (no copy of every row's columns so far per step); a row leaving makes new ones."""
    pairs = [_window(model, t, n) for t, n in zip(TEXTS[:2], (3, 6))]
    ragged = RaggedWindows(model)
    for win, _ in pairs:
        ragged.join(win)
    steps = torch.randint(0, 2000, (12, 2), generator=torch.Generator().manual_seed(5))
    ragged.step(steps[0])
    held = lambda: [t.data_ptr() for t in (ragged.ids, ragged.keys, ragged.values, ragged.token_keys)]  # noqa: E731
    ptrs = held()
    for ids in steps[1:]:
        ragged.step(ids)
    assert held() == ptrs
    assert torch.equal(ragged.ids[:, -12:], steps.t())
    for (_, ref), row in zip(pairs, steps.t()):
        ref.feed(row[None])
    back = ragged.leave(0)
    torch.testing.assert_close(back.keys, pairs[0][1].keys, atol=2e-4, rtol=1e-4)
    assert held()[0] != ptrs[0]  # the remaining row's columns were selected into new tensors
    torch.testing.assert_close(ragged.token_keys[:, -pairs[1][1].n:], pairs[1][1].token_keys, atol=2e-4, rtol=1e-4)


def test_rows_read_prompts_of_different_lengths_together(model):
    """`feed`: each row its own number of tokens at once (rows mid-segment, one empty; some
    cross one or two segment boundaries), then decoding goes on, all as the rows' own windows."""
    gen = torch.Generator().manual_seed(2)
    pairs = [_window(model, t, n) for t, n in zip(TEXTS[:3], (20, 5, 11))]
    pairs.append(tuple(LocalWindow(model, 1, memory=_memory(model, TEXTS[3])) for _ in range(2)))
    ragged = RaggedWindows(model)
    for win, _ in pairs:
        ragged.join(win)
    refs = [ref for _, ref in pairs]
    prompts = [torch.randint(0, 2000, (k,), generator=gen) for k in (9, 30, 3, 50)]
    got = ragged.feed(prompts)
    want = torch.cat([ref.feed(p[None]) for ref, p in zip(refs, prompts)])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert [r.n for r in ragged.rows] == [ref.n for ref in refs] == [5, 11, 14, 2]
    # padding's retrievals are not counted: each bank's hit total is its own window's
    assert [int(r.memory.banks[0]._hits.sum()) for r in ragged.rows] == \
        [int(ref.memory.banks[0]._hits.sum()) for ref in refs]
    for _ in range(12):  # rows 0 and 2 cross a boundary while decoding
        ids = torch.randint(0, 2000, (len(refs),), generator=gen)
        torch.testing.assert_close(ragged.step(ids), torch.cat([ref.feed(ids[b:b + 1, None])
                                                                for b, ref in enumerate(refs)]), atol=2e-4, rtol=1e-4)
    for row, ref in zip(ragged.rows, refs):
        assert row.segments_written == ref.segments_written >= 1
        assert len(row.memory.banks[0]) == len(ref.memory.banks[0])
    # a second prompt after decoding: rows joined at different columns still line up
    prompts = [torch.randint(0, 2000, (k,), generator=gen) for k in (4, 1, 17, 8)]
    got = ragged.feed(prompts)
    want = torch.cat([ref.feed(p[None]) for ref, p in zip(refs, prompts)])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    back = ragged.leave(2)
    t = torch.tensor([[11]])
    torch.testing.assert_close(back.feed(t), refs[2].feed(t), atol=2e-4, rtol=1e-4)


def test_a_row_whose_prompt_ends_a_segment_waits_for_the_others(model):
    """Row 0's prompt fills its segment exactly (its window is then empty) while row 1's goes
    on into the next segment: row 0 waits as padding with no tokens of its own."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 2000, (W,), generator=gen), torch.randint(0, 2000, (W + 6,), generator=gen)]
    ragged, refs = RaggedWindows(model), []
    for text in TEXTS[:2]:
        ragged.join(LocalWindow(model, 1, memory=_memory(model, text)))
        refs.append(LocalWindow(model, 1, memory=_memory(model, text)))
    got = ragged.feed(prompts)
    torch.testing.assert_close(got, torch.cat([r.feed(p[None]) for r, p in zip(refs, prompts)]), atol=2e-4, rtol=1e-4)
    assert [r.n for r in ragged.rows] == [0, 6]
    ids = torch.tensor([5, 6])
    torch.testing.assert_close(ragged.step(ids), torch.cat([r.feed(ids[b:b + 1, None]) for b, r in enumerate(refs)]),
                               atol=2e-4, rtol=1e-4)


def test_rows_read_only_their_own_memory(model):
    """A row's logits do not change when another row's memory holds different text."""
    a, _ = _window(model, TEXTS[0], 7)
    b, _ = _window(model, TEXTS[1], 7)
    c, _ = _window(model, TEXTS[2], 7)  # same prompt as b, other memory
    r1, r2 = RaggedWindows(model), RaggedWindows(model)
    r1.join(a)
    r1.join(b)
    a2, _ = _window(model, TEXTS[0], 7)
    r2.join(a2)
    r2.join(c)
    ids = torch.tensor([5, 9])
    l1, l2 = r1.step(ids), r2.step(ids)
    torch.testing.assert_close(l1[0], l2[0], atol=2e-4, rtol=1e-4)
    assert not torch.allclose(l1[1], l2[1], atol=1e-3)  # the memories differ, and it shows


def test_bad_use_is_refused(model):
    ragged = RaggedWindows(model)
    with pytest.raises(LongsideError, match="join a window"):
        ragged.step(torch.tensor([1]))
    with pytest.raises(LongsideError, match="batch-1"):
        ragged.join(LocalWindow(model, 2, memory=Memory(model.backbone, model.config, 2)))
    ragged.join(LocalWindow(model, 1, memory=Memory(model.backbone, model.config, 1)))
    with pytest.raises(LongsideError, match="one token per row"):
        ragged.step(torch.tensor([1, 2]))
    with pytest.raises(LongsideError, match="one sequence of token ids per row"):
        ragged.feed([torch.tensor([1]), torch.tensor([2])])
    with pytest.raises(LongsideError, match="at least one token"):
        ragged.feed([torch.tensor([], dtype=torch.long)])
    with pytest.raises(LongsideError, match="out of range"):
        ragged.leave(3)


def test_the_readers_window_keys_come_rotated_from_the_cache(model, monkeypatch):
    """During decoding the memory reader takes the window's rotated keys from the backbone's
    cache instead of rotating them again: the same bits, in a window and in a ragged batch
    (padding columns aside), across a segment boundary."""
    import longside.inference.ragged as ragged_mod
    import longside.inference.window as window_mod
    from longside.nn import memory_attention

    checked = []

    def checking(*args, **kwargs):
        mem = memory_attention.memory_inputs(*args, **kwargs)
        if kwargs.get("window_keys") is not None and mem.queries.shape[1] == 1:  # a decode step
            assert mem.rotated_keys is not None
        if mem.rotated_keys is not None:
            again = (mem.rotate_keys or mem.rotate)(mem.keys)
            real = torch.ones(again.shape[:2], dtype=torch.bool) if mem.key_mask is None else \
                (mem.key_mask if mem.key_mask.dim() == 2 else mem.key_mask.any(1))
            assert torch.equal(mem.rotated_keys[real], again[real])
            checked.append(mem.keys.shape[1])
        return mem

    monkeypatch.setattr(ragged_mod, "memory_inputs", checking)
    monkeypatch.setattr(window_mod, "memory_inputs", checking)
    gen = torch.Generator().manual_seed(3)
    pairs = [_window(model, t, n) for t, n in zip(TEXTS[:2], (20, 5))]
    ragged = RaggedWindows(model)
    for win, ref in pairs:
        ragged.join(win)
    for _ in range(8):  # row 0 crosses its segment boundary
        ids = torch.randint(0, 2000, (2,), generator=gen)
        ragged.step(ids)
    ragged.feed([torch.randint(0, 2000, (n,), generator=gen) for n in (3, 9)])  # padding, rows shifted
    for _ in range(3):
        ragged.step(torch.randint(0, 2000, (2,), generator=gen))
    alone = ragged.leave(1)
    for _ in range(3):
        alone.feed(torch.randint(0, 2000, (1, 1), generator=gen))
    assert len(checked) >= 15 and max(checked) > 5


def test_decoding_in_c_equals_the_torch_loops(model, monkeypatch):
    """One token per row goes through the backbone's and the side network's blocks in C
    (kernels/decode_cpu.c); for rows of different lengths (padding hidden by key masks),
    across segment boundaries and reading memory, the logits are the torch loops'."""
    from longside.kernels import ggml_cpu

    calls = {"llama_decode_step": 0, "side_decode_layers": 0}
    for name in calls:
        def counted(*a, _f=getattr(ggml_cpu, name), _n=name, **k):
            calls[_n] += 1
            return _f(*a, **k)
        monkeypatch.setattr(ggml_cpu, name, counted)

    def run(native: bool) -> torch.Tensor:
        monkeypatch.setenv("LONGSIDE_DECODE", "c" if native else "torch")
        gen = torch.Generator().manual_seed(4)
        ragged = RaggedWindows(model)
        for text, n in zip(TEXTS[:3], (20, 5, 11)):
            ragged.join(_window(model, text, n)[0])
        return torch.stack([ragged.step(torch.randint(0, 2000, (3,), generator=gen)) for _ in range(30)])

    c = run(True)
    assert calls["llama_decode_step"] >= 25 and calls["side_decode_layers"] >= 50  # nearly every step in C
    done = dict(calls)
    loops = run(False)
    assert calls == done  # the reference never entered C
    torch.testing.assert_close(c, loops, atol=2e-4, rtol=1e-4)  # as the tests above


def test_rows_with_a_carried_window_step_together_like_their_own_windows(model):
    carrying = LongSideModel(model.backbone, SideNetConfig(window=W, capacity_tokens=4096, window_carry=8),
                             side=model.side).eval()
    # the first two fill their segments at the same steps; the third joins with carried tokens
    pairs = [_window(carrying, t, n) for t, n in zip(TEXTS[:3], (20, 20, 30))]
    ragged = RaggedWindows(carrying)
    assert ragged.batched
    for win, _ in pairs:
        ragged.join(win)
    refs = [ref for _, ref in pairs]
    gen = torch.Generator().manual_seed(2)
    for step in range(34):  # every row crosses a segment boundary and carries its end
        if step == 11:  # a row leaves with its carried tokens and goes on alone
            alone, ref_alone = ragged.leave(2), refs.pop(2)
            assert alone.carried == ref_alone.carried and alone.n == ref_alone.n
        if step == 20:  # prompts of different lengths, one across a boundary
            chunks = [torch.randint(0, 2000, (t,), generator=gen) for t in (23, 3)]
            want = torch.cat([ref.feed(c[None]) for c, ref in zip(chunks, refs)])
            torch.testing.assert_close(ragged.feed(chunks), want, atol=2e-4, rtol=1e-4)
        ids = torch.randint(0, 2000, (len(refs),), generator=gen)
        want = torch.cat([ref.feed(ids[b:b + 1, None]) for b, ref in enumerate(refs)])
        torch.testing.assert_close(ragged.step(ids), want, atol=2e-4, rtol=1e-4)
        if step >= 11:
            t = ids[:1, None]
            torch.testing.assert_close(alone.feed(t), ref_alone.feed(t), atol=2e-4, rtol=1e-4)
    for row, ref in zip(ragged.rows, refs):  # each token stored once, as its own window stores it
        assert row.carried == ref.carried == 8 and row.segments_written == ref.segments_written >= 2
        assert len(row.memory.banks[0]) == len(ref.memory.banks[0])
    for b in reversed(range(len(refs))):  # and they leave as their own windows are
        win, ref = ragged.leave(b), refs[b]
        assert (win.n, win.carried) == (ref.n, ref.carried)
        torch.testing.assert_close(win.ids, ref.ids)


def test_on_int8_products_a_row_reads_and_steps_the_same_whatever_the_batch_holds(model, int8_activations,
                                                                                  monkeypatch):
    # past INT8_MAX_M rows a product (the LM head past FUSED_MAX_M) goes in slabs, not to exact
    # tiles, so a row's logits do not depend on how many rows came with it; the limits are
    # lowered here so that three rows cross them
    from longside.backbone import core, decode_step

    monkeypatch.setattr(decode_step, "INT8_MAX_M", 24)
    monkeypatch.setattr(core, "FUSED_MAX_M", 2)
    ids = [torch.randint(0, 2000, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 5, 11)]

    def run(rows: list[int]) -> list[torch.Tensor]:
        ragged = RaggedWindows(model)
        for i in rows:
            ragged.join(LocalWindow(model, 1, memory=_memory(model, TEXTS[i])))
        out = [ragged.feed([ids[i] for i in rows])]  # 3 rows x 20 columns: 60 rows in each product
        for t in (42, 7, 1999):
            out.append(ragged.step(torch.full((len(rows),), t)))
        return out

    for alone, among in zip(run([0]), run([0, 1, 2])):
        assert (alone[0] - among[0]).abs().max() < 1e-4


def test_a_row_on_the_models_memory_leaves_on_it(model):
    # a window without a memory of its own reads the model's (a `longside chat` session):
    # after a turn on the batch's path it still does, and follows a memory the model is given
    model.init_memory(1)
    ragged = RaggedWindows(model)
    ragged.join(LocalWindow(model, 1))
    ragged.feed([torch.tensor([5, 6, 7])])
    back = ragged.leave(0)
    assert back.memory is model.memory
    model.init_memory(1)
    assert back.memory is model.memory
