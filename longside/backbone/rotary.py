"""Rotary position embedding in the rotate-half layout, shared by the backbone's lean decode
step and the side network."""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout (Llama, Gemma): `x [..., D]` with `cos`,
    `sin` broadcastable to it (e.g. `[B, T, 1, D]` for `x [B, T, H, D]`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary_rows(rot: torch.nn.Module, memo: dict, positions: torch.Tensor,
                limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos, sin `[*positions.shape, D]` float32 of the Hugging Face rotary embedding `rot` at
    `positions` (int64), as rows of a table `rot` made once for positions 0..n-1 (kept in
    `memo`, grown as positions grow, never past `limit`): the same function of the
    position, so the same bits as calling `rot` each time, without its half-dozen small ops
    per call (one position's rows are views of the table: read, never written). None where
    the embedding is not a function of the position alone (dynamic scaling, per-layer
    kinds), for positions outside [0, limit), and off the CPU (reading the positions would
    wait for the device)."""
    if getattr(rot, "rope_type", None) != "default" or not isinstance(getattr(rot, "inv_freq", None), torch.Tensor) \
            or positions.device.type != "cpu" or rot.inv_freq.device.type != "cpu" or not positions.numel():
        return None
    if positions.numel() == 1:  # a decode step's one row: one read of the position
        lo = hi = int(positions.reshape(()))
    else:
        lo, hi = map(int, torch.aminmax(positions))
    if lo < 0 or hi >= limit:  # no row of the table: the embedding computes it
        return None
    table = memo.get("rotary")
    need = hi + 1
    if table is None or table[0].shape[0] < need or table[2] is not rot.inv_freq:
        n = min(max(need, 1024, 0 if table is None else 2 * table[0].shape[0]), limit)
        like = rot.inv_freq.new_empty(0, dtype=torch.float32)
        cos, sin = rot(like, torch.arange(n, device=like.device)[None])
        table = memo["rotary"] = (cos[0].float(), sin[0].float(), rot.inv_freq)
    shape = (*positions.shape, table[0].shape[1])
    if positions.numel() == 1:
        return table[0][lo].view(shape), table[1][lo].view(shape)
    flat = positions.reshape(-1)
    return table[0].index_select(0, flat).view(shape), table[1].index_select(0, flat).view(shape)
