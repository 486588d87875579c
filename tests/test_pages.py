import gc
import mmap
from pathlib import Path

import pytest
import torch

from longside.memory_bank import pages
from longside.memory_bank.bank import MemoryBank


def _vma(ptr: int) -> dict[str, str]:
    """The /proc/self/smaps entry of the mapping holding address `ptr`."""
    entry, found = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            if found:
                break
            lo, hi = (int(x, 16) for x in head.split("-"))
            found = lo <= ptr < hi
        elif found:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
    return entry


def test_empty_is_an_ordinary_tensor_in_aligned_memory():
    """Shape, dtype, writes and reads as torch.empty's; large CPU buffers start on a 2 MB
    boundary and outlive every name but a view of them; small ones and other devices are
    plain torch.empty."""
    t = pages.empty((3, 1024, 1024), torch.float16)
    assert t.shape == (3, 1024, 1024) and t.dtype == torch.float16 and t.is_contiguous()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert t.data_ptr() % pages.HUGE_PAGE == 0
    view = t[1, 7:9]
    del t
    gc.collect()
    view.copy_(torch.arange(2048, dtype=torch.float16).view(2, 1024))
    assert torch.equal(view.flatten()[:5], torch.tensor([0, 1, 2, 3, 4], dtype=torch.float16))
    small = pages.empty((16, 16), torch.int8)
    assert small.shape == (16, 16) and small.dtype == torch.int8
    assert pages.empty((0, 8), torch.float32).numel() == 0


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
LINUX_THP = Path("/proc/self/smaps").exists() and hasattr(mmap, "MADV_HUGEPAGE") and THP.exists()


@pytest.mark.skipif(not LINUX_THP, reason="Linux with transparent huge pages only")
def test_large_buffers_ask_for_huge_pages(monkeypatch):
    """A bank's and its token memory's large buffers lie in mappings advised MADV_HUGEPAGE
    ("hg" in the mapping's VmFlags): the kernel may back them with 2 MB pages whatever THP's
    system setting short of "never"."""
    monkeypatch.delenv("LONGSIDE_HUGE_PAGES", raising=False)
    bank = MemoryBank(num_kv_heads=3, head_dim=64, capacity_tokens=65536, chunk_size=4, token_dim=576)
    for t in (bank._keys, bank._values, bank._chunk_keys, bank.tokens._keys):
        flags = _vma(t.data_ptr()).get("VmFlags", "").split()
        assert "hg" in flags, flags
    # the negative control is a fresh unadvised mapping of our own: where torch.empty's memory
    # lands (the heap, a mapping another allocation advised) is the allocator's business
    plain = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    plain_tensor = torch.frombuffer(plain, dtype=torch.uint8)
    plain_tensor.fill_(1)
    assert "hg" not in _vma(plain_tensor.data_ptr()).get("VmFlags", "").split()


@pytest.mark.skipif(not LINUX_THP, reason="Linux with transparent huge pages only")
def test_huge_pages_can_be_turned_off(monkeypatch):
    """`LONGSIDE_HUGE_PAGES=0`: plain torch.empty, no mapping made and no advice given.
    (Whether torch.empty's own memory carries "hg" depends on the allocator and what it
    reused, so the test watches what `empty` does, not where torch's memory landed.)"""
    made = []
    real_mmap = mmap.mmap
    monkeypatch.setattr(pages.mmap, "mmap", lambda *a, **k: made.append(a) or real_mmap(*a, **k))
    monkeypatch.setenv("LONGSIDE_HUGE_PAGES", "0")
    t = pages.empty((8, 1 << 20), torch.uint8)
    assert t.shape == (8, 1 << 20) and t.dtype == torch.uint8
    assert made == []
    monkeypatch.setenv("LONGSIDE_HUGE_PAGES", "1")
    assert "hg" in _vma(pages.empty((8, 1 << 20), torch.uint8).data_ptr()).get("VmFlags", "").split()
    assert len(made) == 1
