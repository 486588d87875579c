"""NF4 blockwise 4-bit format, packed exactly like bitsandbytes 0.50, and a plain-torch reference.

Layout (bitsandbytes' `quantize_4bit(w, quant_type="nf4")`): the weight `[N, K]` is read
flat in row-major order and cut into blocks of `blocksize` values (a block may span two
rows when K is not a multiple of it). Each block stores the absolute maximum of its
values; each value stores the index of the nearest entry of the 16-value NF4 code after
division by that absmax. Two indices share one byte, the *even* element in the high
nibble: `packed[i] = idx[2i] << 4 | idx[2i+1]`; `packed` is uint8 `[(N*K+1)//2, 1]`.

Double quantization (`compress_statistics=True`) stores the absmax itself in 8 bits:
`offset = absmax.mean()`, and `absmax - offset` is quantized blockwise (blocks of 256)
against bitsandbytes' signed 8-bit dynamic code, with an fp32 scale per block.

Dequantized value = `NF4_CODE[idx] * absmax[block]` in fp32; this module reproduces it
bit for bit, so `bitsandbytes.functional.dequantize_4bit` on our packed weights and our
`dequantize_nf4` on bitsandbytes' agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longside.errors import LongsideError

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), sorted, in [-1, 1].
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): float32 `[256]`, sorted.

    """
    data: list[float] = []
    for i in range(7):  # exponent bits 0..6, 2**i + 1 fraction boundaries each
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@dataclass
class NF4Weight:
    """A weight `[N, K]` in bitsandbytes' NF4 layout.

    packed: uint8 `[(N*K+1)//2, 1]`, two 4-bit code indices a byte, even element high.
    absmax: float32 `[ceil(N*K/blocksize)]`; or, when double-quantized, uint8 of the
        same length (indices into `absmax_code`).
    shape: `(N, K)` (out_features, in_features).
    blocksize: values per absmax block (64 by default).
    absmax_code, absmax_scale, absmax_offset: the double-quantization state (None when
        absmax is plain fp32): float32 `[256]`, float32 `[ceil(len(absmax)/256)]`, float32
        scalar.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int = 64
    absmax_code: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    absmax_blocksize: int = 256

    def __post_init__(self):
        # checked once here: the C and Triton kernels index these buffers without bounds checks
        shape = tuple(self.shape)
        if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise LongsideError(f"NF4Weight shape must be (out_features, in_features) > 0, got {self.shape!r}")
        self.shape = shape
        if not isinstance(self.blocksize, int) or self.blocksize < 2 or self.blocksize % 2:
            raise LongsideError(f"NF4 blocksize must be an even integer >= 2, got {self.blocksize!r}")
        n = shape[0] * shape[1]
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise LongsideError(f"NF4Weight packed must hold {(n + 1) // 2} uint8 bytes for shape {shape}, got "
                                f"{self.packed.numel()} {self.packed.dtype}")
        blocks = -(-n // self.blocksize)
        if self.absmax.numel() != blocks:
            raise LongsideError(f"NF4Weight absmax must hold {blocks} values (one per {self.blocksize}), got "
                                f"{self.absmax.numel()}")
        if self.absmax_scale is not None:
            if self.absmax.dtype != torch.uint8 or self.absmax_code is None or self.absmax_code.numel() != 256:
                raise LongsideError("a double-quantized NF4Weight needs uint8 absmax and a 256-entry absmax_code")
            if self.absmax_scale.numel() != -(-blocks // self.absmax_blocksize):
                raise LongsideError(f"NF4Weight absmax_scale must hold {-(-blocks // self.absmax_blocksize)} values, "
                                    f"got {self.absmax_scale.numel()}")
        elif not self.absmax.is_floating_point():
            raise LongsideError(f"NF4Weight absmax must be floating point, got {self.absmax.dtype}")

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored (packed weights and statistics)."""
        ts = [self.packed, self.absmax, self.absmax_code, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def absmax_f32(self) -> torch.Tensor:
        """float32 `[n_blocks]`, exactly as bitsandbytes' `dequantize_4bit` computes it."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_blockwise(self.absmax, self.absmax_code, self.absmax_scale,
                                     self.absmax_blocksize) + self.absmax_offset

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state: Any) -> "NF4Weight":
        """Wrap bitsandbytes' `(packed, QuantState)` of `quantize_4bit(..., quant_type="nf4")`."""
        qs = quant_state
        if qs.quant_type != "nf4":
            raise LongsideError(f"expected an nf4 QuantState, got quant_type={qs.quant_type!r}")
        if qs.shape is None or len(qs.shape) != 2:
            raise LongsideError(f"expected a 2-d weight, got shape {qs.shape}")
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        kw = {}
        if qs.nested:
            kw = dict(absmax_code=qs.state2.code, absmax_scale=qs.state2.absmax,
                      absmax_offset=torch.as_tensor(qs.offset, dtype=torch.float32),
                      absmax_blocksize=int(qs.state2.blocksize))
        return cls(packed=packed.reshape(-1, 1), absmax=qs.absmax, shape=tuple(qs.shape),
                   blocksize=int(qs.blocksize), **kw)

    def to_bnb(self) -> tuple[torch.Tensor, Any]:
        """`(packed, QuantState)` that `bitsandbytes.functional.dequantize_4bit` accepts."""
        from bitsandbytes.functional import QuantState  # optional: only when converting from bitsandbytes

        state2 = offset = None
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax_scale, code=self.absmax_code,
                                blocksize=self.absmax_blocksize, dtype=torch.float32)
            offset = self.absmax_offset
        qs = QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=NF4_CODE.clone(),
                        blocksize=self.blocksize, quant_type="nf4", dtype=torch.float32,
                        offset=offset, state2=state2)
        return self.packed, qs


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantize a 2-d float weight `[N, K]` to NF4, bit-identical to bitsandbytes on CPU."""
    if w.dim() != 2:
        raise LongsideError(f"quantize_nf4 takes a 2-d weight [out, in], got shape {tuple(w.shape)}")
    if blocksize not in _BLOCKSIZES:
        raise LongsideError(f"blocksize must be one of {_BLOCKSIZES}, got {blocksize}")
    if not w.is_floating_point():
        raise LongsideError(f"quantize_nf4 takes a float weight, got {w.dtype}")
    flat = w.detach().reshape(-1).float().cpu()
    n = flat.numel()
    full = n - n % blocksize
    # Same arithmetic as bitsandbytes' quantize_4bit: full blocks multiply by a clamped
    # reciprocal; a partial tail block divides by its clamped absmax (which is stored).
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the odd tail pairs with 0.0
    bounds = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    idx = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    packed = ((idx[0::2] << 4) | idx[1::2]).reshape(-1, 1)
    if not double_quant:
        return NF4Weight(packed, absmax, (w.shape[0], w.shape[1]), blocksize)
    offset = absmax.mean()
    qabsmax, scale, code = _quantize_blockwise(absmax - offset, 256)
    return NF4Weight(packed, qabsmax, (w.shape[0], w.shape[1]), blocksize,
                     absmax_code=code, absmax_scale=scale, absmax_offset=offset)


def _quantize_blockwise(a: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of the absmax statistics (double quantization).

    a: float32 `[n]`. Returns (uint8 `[n]`, float32 scale `[ceil(n/blocksize)]`, float32
    code `[256]`). bitsandbytes' CPU kernel looks values up with an approximate search
    (BinSearch "Direct2") that sometimes picks the second-nearest code for tiny values; to
    stay bit-identical we call it when it is installed. Without it we pick the nearest
    code (ties to the lower index), which differs from bitsandbytes in about 1% of
    entries, by one code step.
    """
    code = dynamic_code()
    try:
        from bitsandbytes.functional import quantize_blockwise  # optional: the reference check only
    except ImportError:
        quantize_blockwise = None
    if quantize_blockwise is not None:
        q, state = quantize_blockwise(a.contiguous(), code=code.clone(), blocksize=blocksize)
        return q, state.absmax, state.code
    n = a.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(a, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    normed = (padded / absmax.view(-1, 1)).reshape(-1)[:n]
    search = code.clone()
    search[0] = -1.0  # as bitsandbytes' search does, so every normed value has a floor
    lo = (torch.searchsorted(search, normed, right=True) - 1).clamp(0, 254)
    d_lo = (normed - search[lo]).abs()
    d_hi = (normed - search[lo + 1]).abs()
    idx = torch.where(d_hi < d_lo, lo + 1, lo)
    return idx.to(torch.uint8), absmax, code


def _dequantize_blockwise(q: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """uint8 `[n]` -> float32 `[n]`: `code[q] * absmax[i // blocksize]`."""
    n = q.numel()
    vals = code[q.reshape(-1).long()]
    block_of = torch.arange(n) // blocksize
    return vals * absmax[block_of]


def dequantize_nf4(qw: NF4Weight) -> torch.Tensor:
    """float32 `[N, K]`: `NF4_CODE[idx] * absmax[block]`, bit-identical to bitsandbytes."""
    n_el = qw.shape[0] * qw.shape[1]
    p = qw.packed.reshape(-1)
    idx = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n_el].long()
    vals = NF4_CODE.to(p.device)[idx]
    absmax = qw.absmax_f32().to(p.device)
    block_of = torch.arange(n_el, device=p.device) // qw.blocksize
    return (vals * absmax[block_of]).view(qw.shape)


def matmul_nf4_reference(x: torch.Tensor, qw: NF4Weight) -> torch.Tensor:
    """`x @ W.T` with W dequantized in fp32. x: float `[..., K]` -> float32 `[..., N]`."""
    return torch.nn.functional.linear(x.float(), dequantize_nf4(qw))
