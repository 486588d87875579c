"""`Room`: a buffer with room to grow behind tensors that view its first positions.

Decoding appends one position per token to many tensors (a window's token ids and keys, each
side block's key/value cache); `torch.cat` copies everything so far each time. A view of a
buffer with room only writes the new positions. Views can be shared (`LocalWindow.fork`
copies its lists, not its tensors), so a buffer records the most positions any view was
handed (`filled`): only a view of exactly that many may grow in place, a shorter one (a fork
whose twin grew first) continues in a buffer of its own.
"""

from __future__ import annotations

import torch


class Room:
    """`buf`: the buffer, positions along `dim`; `filled`: the most positions handed out."""

    def __init__(self, buf: torch.Tensor, dim: int, filled: int):
        self.buf, self.dim, self.filled = buf, dim, filled

    @classmethod
    def grow(cls, room: "Room | None", now: torch.Tensor, t: int, dim: int) -> "Room":
        """The room in which `now` (n positions along `dim`) continues with t more: `room`
        where `now` is its view of exactly `filled` positions and t more fit, else a new
        buffer (twice what is needed, at least 64) with `now` copied in. `filled` becomes
        n + t; the caller writes the t new positions (`buf.narrow(dim, n, t)`)."""
        n = now.shape[dim]
        if room is None or room.filled != n or room.buf.shape[dim] < n + t or room.buf.dtype != now.dtype \
                or room.buf.data_ptr() != now.data_ptr() or room.buf.stride() != now.stride() \
                or any(a != b for i, (a, b) in enumerate(zip(room.buf.shape, now.shape)) if i != dim):
            shape = list(now.shape)
            shape[dim] = max(64, 2 * (n + t))
            room = cls(now.new_empty(shape), dim, n)
            room.buf.narrow(dim, 0, n).copy_(now)
        room.filled = n + t
        return room

    def view(self, n: int) -> torch.Tensor:
        """The first n positions."""
        return self.buf.narrow(self.dim, 0, n)


def append(rooms: dict[str, Room], name: str, now: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`now [B, n, ...]` followed by `new [B, t, ...]` along dim 1, as a view of the buffer
    `rooms[name]` (made or replaced as `Room.grow` decides): only the t new positions are
    written, not the n so far (`torch.cat` copies them every time)."""
    n, t = now.shape[1], new.shape[1]
    room = rooms[name] = Room.grow(rooms.get(name), now, t, 1)
    room.buf[:, n:n + t] = new
    return room.view(n + t)
