"""The memory layer of the side network: what it takes from the backbone (`MemoryInputs`,
built by `memory_inputs`) and how it reads retrieved memory (`MemoryReader`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from longside.backbone import Backbone, BackboneOutput, BackboneSpec
from longside.errors import LongsideError
from longside.kernels import ggml_cpu
from longside.nn.attention import attend_retrieved, causal_lse


@dataclass
class MemoryInputs:
    """What the memory layer needs from the frozen backbone for one segment.

    queries: `[B, T, H, D]` the memory layer's pre-rotary queries; attn: `[B, T, H, D]` its
    local attention output; keys: `[B, P+T, G, D]` the pre-rotary keys of the local window
    up to the newest token, i.e. the P tokens already cached (0 for a whole segment) and
    the T new ones (for the joint softmax); retrieve: `(queries [B,T,H,D]) -> (keys, values
    [B,T,H,S,D], mask [B,T,H,S])` from the memory bank; out_proj: the layer's frozen output
    projection `[..., H*D] -> [..., d]`; rotate: the backbone's rotary embedding at the new
    tokens' positions P..P+T-1, `[B, T, h, D] -> same`; rotate_keys: the same at positions
    0..P+T-1 for `keys` (None: `rotate`, valid when P = 0).
    """

    queries: torch.Tensor
    attn: torch.Tensor
    keys: torch.Tensor
    retrieve: Callable
    out_proj: Callable
    rotate: Callable
    rotate_keys: Callable | None = None
    key_mask: torch.Tensor | None = None  # [B, P+T] or [B, T, P+T] bool: real keys (rows of different lengths)
    rotated_keys: torch.Tensor | None = None  # [B, P+T, G, D]: `keys` already rotated (the backbone's cache)
    rotary: Callable | None = None  # () -> cos, sin [B, T, D] float32: what `rotate` multiplies with
    rotate_at: Callable | None = None  # (x [B, T, h, D], distance) -> x rotated at that position, every token


class MemoryReader(nn.Module):
    """Memory-augmented attention in the backbone's own key space at the memory layer.

    The query is the backbone's own pre-rotary query plus a learned correction from the
    side state (zero at init), so retrieval is meaningful from the first step (LongMem
    initialises its memory layer from the cached block for the same reason). Attention over
    retrieved memory is position-free; it is combined with the layer's local (causal,
    rotary) attention either by a learned per-head gate (two softmaxes, LongMem) or by one
    joint softmax. What memory changes, `out_proj(A - A_local)`, enters the side stream;
    with an empty bank it is exactly zero.

    `distance` > 0 scores memory keys as if they sat that many tokens before the query (the
    query rotated at that position; keys are stored before rotation), as backbone memory
    does: position-free scores (distance 0) let heads that attend by position put all their
    weight on whichever memory key happens to align with the unrotated query.
    """

    def __init__(self, side_dim: int, spec: BackboneSpec, mode: str, gate_init: float, into_side: torch.Tensor,
                 distance: int = 0):
        super().__init__()
        self.mode, self.heads, self.head_dim, self.distance = mode, spec.num_heads, spec.head_dim, distance
        self.q_delta = nn.Linear(side_dim, spec.num_heads * spec.head_dim, bias=False)
        nn.init.zeros_(self.q_delta.weight)
        self.gate = nn.Parameter(torch.full((spec.num_heads,), float(gate_init)))
        self.into_side = nn.Linear(spec.hidden_size, side_dim, bias=False)
        with torch.no_grad():
            self.into_side.weight.copy_(into_side)

    def forward(self, x: torch.Tensor, mem: MemoryInputs) -> torch.Tensor:
        """x `[B, T, s]` side state -> `[B, T, s]` memory contribution."""
        B, T, _ = x.shape
        q = mem.queries + _linear(self.q_delta, x).view(B, T, self.heads, self.head_dim)
        if self.distance and mem.rotate_at is None:
            raise LongsideError("this memory reader scores memory at a rotary distance; its inputs lack rotate_at")
        qm = mem.rotate_at(q, self.distance) if self.distance else q  # what memory keys are scored with
        keys, values, mask = mem.retrieve(qm.detach())
        if keys.shape[3] == 0 or not bool(mask.any()):
            return x.new_zeros(x.shape)
        delta = self._read_step(q, qm, keys, values, mask, mem) if T == 1 else None
        if delta is None:
            delta = self._read(q, qm, keys, values, mask, mem)
        return _linear(self.into_side, mem.out_proj(delta.flatten(2)))

    def _read(self, q: torch.Tensor, qm: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              mask: torch.Tensor, mem: MemoryInputs) -> torch.Tensor:
        """What memory changes in the layer's attention output, `[B, T, H, D]`; `q` the
        pre-rotary query, `qm` the one memory keys are scored with."""
        a_mem, lse_mem, has = attend_retrieved(qm, keys, values, mask)
        if self.mode == "gated":
            w = torch.sigmoid(self.gate).view(1, 1, -1, 1) * has
        else:
            kr = mem.rotated_keys if mem.rotated_keys is not None else (mem.rotate_keys or mem.rotate)(mem.keys)
            local = causal_lse(mem.rotate(q), kr, mem.key_mask)
            w = torch.sigmoid(lse_mem - local) * has
        return w * (a_mem - mem.attn)

    def _read_step(self, q: torch.Tensor, qm: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor, mem: MemoryInputs) -> torch.Tensor | None:
        """`_read` for one token per row in one C call (a decode step: the ~30 small torch ops
        of `_read` cost more than their arithmetic), or None where it cannot run (gradients,
        another device or layout)."""
        if torch.is_grad_enabled() or q.device.type != "cpu" or q.dtype != torch.float32 \
                or not ggml_cpu.decode_in_c():
            return None
        B, _, H, D = q.shape
        gate = kr = rot = None
        if self.mode == "gated":  # the gate replaces the local log-sum-exp: no local keys read
            gate, qr = self.gate.detach().float().contiguous(), q
        else:
            cs = mem.rotary() if mem.rotary is not None and qm is q else None
            if cs is not None and cs[0].dtype == torch.float32:  # rotated in the call (it rotates `qm`)
                qr, rot = None, (cs[0][:, 0].contiguous(), cs[1][:, 0].contiguous())
            else:
                qr = mem.rotate(q)
            kr = mem.rotated_keys if mem.rotated_keys is not None else (mem.rotate_keys or mem.rotate)(mem.keys)
            kr = kr.transpose(1, 2)  # [B, G, P+1, D]: the caches' own layout, usually
            if kr.stride(-1) != 1 or kr.stride(-2) != D:
                kr = kr.contiguous()
        try:
            key_mask = None if kr is None else ggml_cpu.key_mask_bytes(mem.key_mask, B, kr.shape[2])
            delta = ggml_cpu.memory_read_step(qm[:, 0].contiguous(), None if qr is None else qr[:, 0].contiguous(),
                                              keys[:, 0], values[:, 0], mask[:, 0], kr, key_mask,
                                              mem.attn[:, 0].contiguous(), gate, D ** -0.5, rotary=rot)
        except ValueError:
            return None
        return delta[:, None]


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`; one row of a plain bias-free `nn.Linear` without gradients (a decode step)
    as a matrix-vector product, which takes ~40% less time than the matrix product the layer
    calls for one row (MKL, cold caches)."""
    if x.numel() == x.shape[-1] and type(layer) is nn.Linear and layer.bias is None and not torch.is_grad_enabled() \
            and x.dtype == layer.weight.dtype and x.device == layer.weight.device:
        return torch.mv(layer.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
    return layer(x)


def memory_inputs(backbone: Backbone, out: BackboneOutput, layer: int, retrieve: Callable,
                  start: int = 0, window_keys: torch.Tensor | None = None, *,
                  positions: torch.Tensor | None = None, key_positions: torch.Tensor | None = None,
                  key_mask: torch.Tensor | None = None) -> MemoryInputs:
    """Bundle what `MemoryReader` needs from one backbone pass (`out = encode(ids, layer)`).

    For a whole segment, `start = 0` and `window_keys = None`. For incremental decoding
    the T new tokens sit at positions `start..start+T-1` of the window and `window_keys
    [B, start+T, G, D]` are the memory layer's pre-rotary keys of the whole window so far
    (the cached ones, then `out.memory_keys`).

    Rows at different positions (inference/ragged.py) give `positions [B, T]` of the new
    tokens, `window_keys [B, S, G, D]` padded on the left, their `key_positions [B, S]`
    and `key_mask [B, S]` (True: a real key); `start` is not used then."""
    B, T = out.memory_queries.shape[:2]
    dev = out.memory_queries.device
    keys = out.memory_keys if window_keys is None else window_keys
    if positions is None:
        if keys.shape[1] != start + T:
            raise LongsideError(f"window_keys cover {keys.shape[1]} positions, expected start + T = {start + T}")
        positions = torch.arange(start, start + T, device=dev).expand(B, T)
    elif key_positions is None or key_mask is None or window_keys is None:
        raise LongsideError("positions per row need window_keys, key_positions and key_mask")
    # during decoding the cache holds the window's keys rotated at their positions: the
    # same bits as rotating `keys` again (one rotary function, the same positions)
    rotated = out.memory_keys_rotated
    if window_keys is None or rotated is None or rotated.shape[2] != keys.shape[1] or rotated.dtype != keys.dtype:
        rotated = None
    if key_positions is not None:
        rotate_keys = (lambda x: backbone.rotate(x, key_positions, layer))
    elif start and window_keys is not None:  # the window's positions 0..start+T-1, made if read (decoding reads the cache's)
        rotate_keys = (lambda x: backbone.rotate(x, torch.arange(start + T, device=dev).expand(B, start + T), layer))
    else:
        rotate_keys = None
    return MemoryInputs(
        queries=out.memory_queries, attn=out.memory_attn, keys=keys, retrieve=retrieve,
        out_proj=lambda a: backbone.attn_output(layer, a), rotate=lambda x: backbone.rotate(x, positions, layer),
        rotate_keys=rotate_keys, key_mask=key_mask, rotated_keys=None if rotated is None else rotated.transpose(1, 2),
        rotary=lambda: backbone.rotary(positions, layer),
        rotate_at=lambda x, d: backbone.rotate(x, torch.full(x.shape[:2], d, device=x.device), layer))
