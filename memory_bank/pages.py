"""Large CPU buffers in memory the kernel may back with 2 MB pages (the memory bank's, and the
GGUF blocks the backbone's loader gathers with `kernels.gguf_linear.gather_blocks`).

A decode step streams the backbone's 4-bit blocks (~90 MB for SmolLM2) and scans a bank's
chunk keys and its token memory's int8 projections (~15 MB at 64k tokens) once per token.
In 4 KB pages every 4 KB of that costs a TLB miss, and the hardware prefetchers stop at each
page's end; in 2 MB pages (transparent huge pages) neither happens. Where THP is set to
"madvise" (the default of many distributions) only memory that asks for them gets them:
`empty` asks. Measured: docs/results.md#huge-pages.
"""

from __future__ import annotations

import math
import mmap
import os

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 << 20  # below this a buffer spans too few huge pages to matter


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype, device=device)`; on the CPU, from MIN_BYTES up, a view
    of a private anonymous mapping aligned to 2 MB and advised MADV_HUGEPAGE (its pages are
    made when first written, as torch.empty's; they read as zeros). The tensor keeps the
    mapping alive. Elsewhere (another device, a platform without the advice, or
    `LONGSIDE_HUGE_PAGES=0` in the environment), torch.empty."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE") \
            or not hasattr(mmap, "MAP_ANONYMOUS") or os.environ.get("LONGSIDE_HUGE_PAGES", "1") == "0":
        return torch.empty(shape, dtype=dtype, device=device)
    # private: a shared anonymous mapping is shmem, which THP's "madvise" setting leaves out
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP: plain pages, still a valid buffer
        pass
    raw = torch.frombuffer(area, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes].view(dtype).view(shape)
