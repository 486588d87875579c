"""GGUF (ggml) weight blocks as they are stored in the file: formats and a torch reference.

A ggml weight `[N, K]` is N rows of `K / block_elems` blocks, each `block_bytes` long, so a
`GGMLWeight` keeps the file's bytes as uint8 `[N, row_bytes]`. Rows are whole, so a row
permutation (Llama's q/k reordering) permutes rows of bytes and leaves every block intact.

Block formats (ggml type id, elements, bytes; f16 = IEEE half, little-endian):

- Q4_0 (2, 32, 18): d f16, qs[16]; element j<16 = d * (lo nibble of qs[j] - 8), j>=16 the
  high nibble of qs[j-16].
- Q4_1 (3, 32, 20): d f16, m f16, qs[16]; element = d * nibble + m.
- Q5_0 (6, 32, 22): d f16, qh uint32, qs[16]; element j = d * ((nibble j as in Q4_0) |
  (bit j of qh) << 4) - 16).
- Q8_0 (8, 32, 34): d f16, qs int8[32]; element = qs * d.
- Q4_K (12, 256, 144): d f16, dmin f16, scales[12] (8 six-bit scales and mins), qs[128];
  sub-block j (32 elements) = (d*sc[j]) * nibble - dmin*min[j].
- Q6_K (14, 256, 210): ql[128], qh[64], scales int8[16], d f16; element = (d*scale) * (q6 - 32).

Q4_0, Q4_1 and Q8_0 weights may be held in the *lanes* layout (`pack_lanes`): the same bytes
of each group of 16 rows reordered so that the decode kernel reads, per block, the 16 rows'
codes already transposed (64 bytes per code dword: that dword of rows 0..15; 4 dwords for
Q4, 8 for Q8_0), then the 16 rows' d and (Q4_1) m halves. A group of 16 rows keeps its 16 x row_bytes bytes, so a packed
weight is still uint8 `[N, row_bytes]`, its row ranges at multiples of 16 are packed weights
too, and nothing is dequantized or re-quantized: `unpack_lanes` gives the file's bytes back.

`dequantize_reference` reproduces the `gguf` package's numpy dequantization bit for bit
(same fp32 operations in the same order); the C and Triton kernels are tested against it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from longside.errors import LongsideError

# name -> (ggml type id, elements per block, bytes per block)
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q6_K": (14, 256, 210),
}


# where each format keeps its f16 scales (byte offsets in a block)
_SCALE_BYTES = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}


def type_info(qtype: str) -> tuple[int, int, int]:
    """(ggml type id, elements per block, bytes per block) of a supported block type."""
    try:
        return GGML_TYPES[qtype]
    except KeyError:
        raise LongsideError(f"ggml block type {qtype!r} is not supported; longside runs "
                            f"{', '.join(GGML_TYPES)}") from None


# the layout the decode kernel reads: groups of LANE_ROWS rows (kernels/ggml_cpu.c)
LANE_ROWS = 16
LANE_TYPES = ("Q4_0", "Q4_1", "Q8_0")


@dataclass
class GGMLWeight:
    """A weight `[N, K]` in a ggml block format: `blocks` uint8 `[N, row_bytes]`, the file's
    bytes, in the file's order (`packed=False`) or in the lanes layout (`pack_lanes`)."""

    blocks: torch.Tensor
    qtype: str
    shape: tuple[int, int]
    packed: bool = False

    def __post_init__(self):
        _, elems, nbytes = type_info(self.qtype)
        n, k = self.shape
        if k % elems:
            raise LongsideError(f"{self.qtype} weight with {k} columns: K must be a multiple of {elems}")
        if self.blocks.dtype != torch.uint8 or tuple(self.blocks.shape) != (n, k // elems * nbytes):
            raise LongsideError(f"{self.qtype} blocks {tuple(self.blocks.shape)} {self.blocks.dtype} do not "
                                f"hold a [{n}, {k}] weight (expected uint8 [{n}, {k // elems * nbytes}])")
        if self.packed and not can_pack_lanes(self.qtype, n):
            raise LongsideError(f"a {self.qtype} weight of {n} rows cannot be in the lanes layout "
                                f"({', '.join(LANE_TYPES)}, rows a multiple of {LANE_ROWS})")

    @property
    def row_bytes(self) -> int:
        return self.blocks.shape[1]

    def file_blocks(self) -> torch.Tensor:
        """uint8 `[N, row_bytes]` in the file's order (a new tensor when packed)."""
        return unpack_lanes(self.blocks, self.qtype) if self.packed else self.blocks


def can_pack_lanes(qtype: str, n_rows: int) -> bool:
    """True where `pack_lanes` applies: Q4_0 / Q4_1 / Q8_0 with rows a multiple of `LANE_ROWS`."""
    return qtype in LANE_TYPES and n_rows % LANE_ROWS == 0 and n_rows > 0


def _lane_shape(blocks: torch.Tensor, qtype: str) -> tuple[int, int, int, int]:
    """(groups of 16 rows, blocks per row, the codes' offset in a block: its f16 halves' bytes,
    code dwords per block)."""
    n, rb = blocks.shape
    return n // LANE_ROWS, rb // type_info(qtype)[2], 4 if qtype == "Q4_1" else 2, 8 if qtype == "Q8_0" else 4


def pack_lanes(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """File-order uint8 `[N, row_bytes]` (Q4_0/Q4_1/Q8_0, N a multiple of 16; another dtype
    moves alike) -> the lanes layout, same shape: per 16 rows and block, 4 (Q8_0: 8) x 64
    bytes (code dword j of rows 0..15), then the 16 d halves, then (Q4_1) the 16 m halves."""
    if not can_pack_lanes(qtype, blocks.shape[0]):
        raise LongsideError(f"cannot pack {qtype} blocks of {blocks.shape[0]} rows into lanes")
    g, nb, off, cw = _lane_shape(blocks, qtype)
    b = blocks.reshape(g, LANE_ROWS, nb, -1)
    codes = b[..., off:].reshape(g, LANE_ROWS, nb, cw, 4).permute(0, 2, 3, 1, 4).reshape(g, nb, 64 * cw)
    halves = b[..., :off].reshape(g, LANE_ROWS, nb, off // 2, 2).permute(0, 2, 3, 1, 4).reshape(g, nb, LANE_ROWS * off)
    return torch.cat([codes, halves], -1).reshape(blocks.shape).contiguous()


def unpack_lanes(packed: torch.Tensor, qtype: str) -> torch.Tensor:
    """The inverse of `pack_lanes`: the file's bytes back, uint8 `[N, row_bytes]`."""
    if not can_pack_lanes(qtype, packed.shape[0]):
        raise LongsideError(f"{qtype} blocks of {packed.shape[0]} rows are not in the lanes layout")
    g, nb, off, cw = _lane_shape(packed, qtype)
    p = packed.reshape(g, nb, -1)
    codes = p[..., :64 * cw].reshape(g, nb, cw, LANE_ROWS, 4).permute(0, 3, 1, 2, 4).reshape(g, LANE_ROWS, nb, 4 * cw)
    halves = p[..., 64 * cw:].reshape(g, nb, off // 2, LANE_ROWS, 2).permute(0, 3, 1, 2, 4)
    return torch.cat([halves.reshape(g, LANE_ROWS, nb, off), codes], -1).reshape(packed.shape).contiguous()


def lane_rows(packed: torch.Tensor, qtype: str, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows [n]` int64 of a lanes-packed weight in the file's order, uint8
    `[n, row_bytes]` (an embedding's lookup without unpacking the whole table): one gather."""
    if not can_pack_lanes(qtype, packed.shape[0]):
        raise LongsideError(f"{qtype} blocks of {packed.shape[0]} rows are not in the lanes layout")
    rows = rows.long()
    if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < packed.shape[0]):
        raise IndexError(f"row ids out of range for {packed.shape[0]} rows")
    rb = packed.shape[1]
    where = _lane_offsets(qtype, rb).to(packed.device)[rows % LANE_ROWS]  # [n, row_bytes] within the group
    return packed.reshape(-1)[where + (rows // LANE_ROWS * LANE_ROWS * rb)[:, None]]


@functools.cache
def _lane_offsets(qtype: str, row_bytes: int) -> torch.Tensor:
    """int64 `[LANE_ROWS, row_bytes]`: where byte j of lane l's row (file order) lies in its
    packed group (`pack_lanes` of a group whose bytes are their own offsets)."""
    packed_pos = pack_lanes(torch.arange(LANE_ROWS * row_bytes).reshape(LANE_ROWS, row_bytes), qtype).reshape(-1)
    where = torch.empty_like(packed_pos)  # packed position p holds file offset packed_pos[p]
    where[packed_pos] = torch.arange(packed_pos.numel())
    return where.reshape(LANE_ROWS, row_bytes)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., 2]` little-endian halves -> float32 `[...]`."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """uint8 `[B, G*group]` -> `[B, 2*G*group]`: per group of `group` bytes the low
    nibbles, then the high nibbles (ggml's element order)."""
    b = qs.shape[0]
    q = qs.reshape(b, -1, 1, group)
    q = torch.cat([q & 0x0F, q >> 4], dim=2)
    return q.reshape(b, -1)


def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed scale bytes of Q4_K blocks `[B, 12]` -> (scales, mins) uint8 `[B, 8]`."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def dequantize_blocks(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 `[B, block_bytes]` -> float32 `[B, block_elems]`, bit-identical to `gguf.quants`."""
    _, elems, nbytes = type_info(qtype)
    if blocks.shape[-1] != nbytes:
        raise LongsideError(f"{qtype} blocks are {nbytes} bytes, got {blocks.shape[-1]}")
    n = blocks.shape[0]
    if qtype == "Q4_0":
        d = _f16(blocks[:, 0:2])[:, None]
        q = _nibbles(blocks[:, 2:], 16).to(torch.int8) - 8
        return d * q.float()
    if qtype == "Q4_1":
        d, m = _f16(blocks[:, 0:2])[:, None], _f16(blocks[:, 2:4])[:, None]
        return d * _nibbles(blocks[:, 4:], 16).float() + m
    if qtype == "Q5_0":
        d = _f16(blocks[:, 0:2])[:, None]
        qh = blocks[:, 2:6].contiguous().view(torch.int32)  # little-endian bits 0..31
        high = ((qh >> torch.arange(32, dtype=torch.int32, device=qh.device)) & 1).to(torch.uint8)
        q = (_nibbles(blocks[:, 6:], 16) | (high << 4)).to(torch.int8) - 16
        return d * q.float()
    if qtype == "Q8_0":
        d = _f16(blocks[:, 0:2])[:, None]
        return blocks[:, 2:].contiguous().view(torch.int8).float() * d
    if qtype == "Q4_K":
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _q4_k_scales(blocks[:, 4:16])
        dd = (d[:, None] * sc.float())[:, :, None]
        dm = (dmin[:, None] * mn.float())[:, :, None]
        q = _nibbles(blocks[:, 16:], 32).reshape(n, 8, 32).float()
        return (dd * q - dm).reshape(n, 256)
    # Q6_K
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks[:, 208:210])
    dd = (d[:, None] * scales).reshape(n, 16, 1)
    lo = _nibbles(ql, 64).reshape(n, 2, 4, 32)  # per half: [ql lo 0:32, ql lo 32:64, hi 0:32, hi 32:64]
    hi = qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qh.device).reshape(1, 1, 4, 1)
    q = (lo | ((hi & 0x03) << 4)).to(torch.int8) - 32
    return (dd * q.reshape(n, 16, 16).float()).reshape(n, 256)


def dequantize_reference(w: GGMLWeight) -> torch.Tensor:
    """The whole weight as float32 `[N, K]` (plain torch; slow, for tests and fallbacks)."""
    _, elems, nbytes = type_info(w.qtype)
    n, k = w.shape
    flat = w.file_blocks().reshape(-1, nbytes)
    return dequantize_blocks(flat, w.qtype).reshape(n, k)


def random_weight(qtype: str, n: int, k: int, seed: int = 0, scale: float = 0.01) -> GGMLWeight:
    """A weight `[n, k]` of random blocks whose f16 scale fields are small finite halves (as
    a real file's are), for tests and benchmarks: kernel speed does not depend on the values."""
    _, elems, nbytes = type_info(qtype)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n * k // elems, nbytes), dtype=torch.uint8, generator=g)
    for at in _SCALE_BYTES[qtype]:
        halves = (torch.randn(len(blocks), generator=g) * scale).half()
        blocks[:, at:at + 2] = halves.view(torch.uint8).reshape(-1, 2)
    return GGMLWeight(blocks.reshape(n, -1), qtype, (n, k))


def llama_row_order(n_rows: int, n_head: int) -> torch.Tensor:
    """Row indices that undo llama.cpp's q/k reordering for rotary embedding: the
    Hugging Face row r is the file's row `order[r]` (`n_head`: heads of that projection)."""
    dim = n_rows // n_head // 2
    # the file's row (h, j, i) is Hugging Face's row (h, i, j): i the rotary half, j < dim
    order = torch.arange(n_rows).reshape(n_head, dim, 2).transpose(1, 2).reshape(-1)
    return order
