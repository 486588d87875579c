"""One-file persistence of a MemoryBank, atomic and checksummed.

File layout (all integers little-endian):

    b"LSMB"                  magic
    u32                      format version (FORMAT_VERSION)
    u64                      header length N
    N bytes                  header, JSON: config, owner, state, table of arrays
    arrays                   raw bytes, back to back, in the header's order
    32 bytes                 sha256 of everything above

The file is written to a temporary name beside `path` and renamed into place only when
complete (longside.paths.atomic_file), so a crash never leaves a half-written bank under
the real name and the previous good file survives. On load the checksum is verified
before anything is parsed: a truncated or corrupt file is refused with MemoryBankError.
Only the slots in use are written, so a part-full bank makes a small file.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from longside.errors import MemoryBankError
from longside.paths import atomic_file, recover

from .eviction import make_policy

MAGIC = b"LSMB"
FORMAT_VERSION = 1
_DIGEST = 32


class _HashingWriter:
    """Writes to a file and a running sha256 together."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> None:
        self.f.write(data)
        self.sha.update(data)


def _raw(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a uint8 array (works for any dtype, bfloat16 included)."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().reshape(-1)


def save_bank(bank, path: Path) -> None:
    """Write `bank` (a `MemoryBank`) to `path` (the caller holds the bank's lock)."""
    used = bank._used
    arrays: dict[str, np.ndarray] = {
        "keys": _raw(bank._keys[:, :used]),
        "values": _raw(bank._values[:, :used]),
        "chunk_keys": _raw(bank._chunk_keys[:, :used]),
        "fill": _raw(bank._fill[:used]),
        "hits": _raw(bank._hits[:used]),
        "queue": bank._queue.items().view(np.uint8),
        "free": bank._free[:bank._nfree].copy().view(np.uint8),
    }
    if bank.tokens is not None:
        arrays.update({k: _raw(v) for k, v in bank.tokens.arrays().items()})
    if bank._ivf is not None and bank._ivf.trained:
        for h, blob in enumerate(bank._ivf.serialize()):
            arrays[f"ivf{h}"] = blob
    header = {
        "config": bank.config(),
        "owner": bank.owner,
        "state": {"used": used, "partial": bank._partial, "tokens": bank._tokens,
                  "evicted_chunks": bank._evicted_chunks, "dropped_tokens": bank._dropped_tokens,
                  "token_memory": bank.tokens.state() if bank.tokens is not None else None},
        "arrays": [[name, int(a.nbytes)] for name, a in arrays.items()],
    }
    head = json.dumps(header).encode()
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        w = _HashingWriter(f)
        w.write(MAGIC + struct.pack("<IQ", FORMAT_VERSION, len(head)))
        w.write(head)
        for a in arrays.values():
            w.write(memoryview(np.ascontiguousarray(a)))
        f.write(w.sha.digest())


def _corrupt(path: Path, why: str) -> MemoryBankError:
    return MemoryBankError(
        f"memory bank file {path} is unusable ({why}); it is truncated, corrupt or not a "
        "longside memory bank. Delete it, or restore the previous copy, and rebuild the memory.")


def _map(path: Path) -> memoryview:
    """The file's bytes, mapped copy-on-write: checked and copied out without reading the
    file into a buffer first (a 16k-token bank is ~36 MB; 17 ms less than `readinto` a
    buffer here), writable so that tensors can view it, and a write to them would never
    reach the file. Limit: a file truncated in place by another process while it is read
    ends the process (SIGBUS); longside itself only ever replaces bank files by renaming."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))


def load_bank(cls: type, path: Path, *, expect_owner: str | None, device, eviction):
    recover(path)
    try:
        data = _map(path)
    except FileNotFoundError:
        raise MemoryBankError(f"no memory bank at {path}; save one first with MemoryBank.save") from None
    except OSError as e:
        raise MemoryBankError(f"cannot read memory bank {path}: {e}") from None
    if len(data) < len(MAGIC) + 12 + _DIGEST:
        raise _corrupt(path, f"only {len(data)} bytes")
    if bytes(data[:4]) != MAGIC:
        raise _corrupt(path, "bad magic number")
    sha = hashlib.sha256(data[:-_DIGEST])
    if sha.digest() != bytes(data[-_DIGEST:]):
        raise _corrupt(path, "checksum mismatch")
    sha.update(data[-_DIGEST:])  # the whole file's SHA-256 for callers that keep one, without a second pass
    version, head_len = struct.unpack("<IQ", data[4:16])
    if version != FORMAT_VERSION:
        raise MemoryBankError(
            f"memory bank {path} has format version {version}; this longside reads version "
            f"{FORMAT_VERSION}. Rebuild the memory with this version.")
    try:
        header = json.loads(bytes(data[16:16 + head_len]))
        cfg, state = dict(header["config"]), header["state"]
    except (ValueError, KeyError) as e:
        raise _corrupt(path, f"bad header: {e}") from None
    owner = header.get("owner")
    if expect_owner is not None and owner != expect_owner:
        raise MemoryBankError(
            f"memory bank {path} was written by {owner!r}, not by {expect_owner!r}: its keys "
            "live in another model's space and would retrieve nonsense. Rebuild the memory "
            "with this backbone and layer.")

    arrays: dict[str, memoryview] = {}
    offset = 16 + head_len
    for name, nbytes in header["arrays"]:
        arrays[name] = data[offset:offset + nbytes]
        offset += nbytes
    if offset != len(data) - _DIGEST:
        raise _corrupt(path, "array table does not match the file size")

    policy_name, policy_cfg = cfg.pop("eviction"), cfg.pop("eviction_config")
    if eviction is None:
        try:
            eviction = make_policy(policy_name, policy_cfg)
        except MemoryBankError:
            raise MemoryBankError(
                f"memory bank {path} uses the custom eviction policy {policy_name!r}; pass "
                "that policy object as MemoryBank.load(..., eviction=policy)") from None
    dtype = getattr(torch, cfg.pop("dtype"))
    bank = cls(**cfg, dtype=dtype, device=device, eviction=eviction)
    bank.file_sha256 = sha.hexdigest()

    used = state["used"]
    if used > bank.capacity_chunks:
        raise _corrupt(path, "more slots than capacity")

    def tensor(name: str, dt: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        buf = arrays[name]
        if len(buf) == 0:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dt).view(shape)

    H, S, D = bank.num_kv_heads, bank.chunk_size, bank.head_dim
    with torch.no_grad():
        bank._keys[:, :used] = tensor("keys", dtype, (H, used, S, D)).to(bank.device)
        bank._values[:, :used] = tensor("values", dtype, (H, used, S, D)).to(bank.device)
        bank._chunk_keys[:, :used] = tensor("chunk_keys", dtype, (H, used, D)).to(bank.device)
        bank._fill[:used] = tensor("fill", torch.uint8, (used,)).to(bank.device)
        bank._hits[:used] = tensor("hits", torch.int32, (used,)).to(bank.device)
    queue = np.frombuffer(arrays["queue"], dtype=np.int64)
    free = np.frombuffer(arrays["free"], dtype=np.int64)
    bank._queue.push(queue)
    bank._free[:len(free)] = free
    bank._nfree = len(free)
    bank._used = used
    bank._partial = state["partial"]
    bank._tokens = state["tokens"]
    bank._evicted_chunks = state["evicted_chunks"]
    bank._dropped_tokens = state["dropped_tokens"]
    if bank.tokens is not None:
        tm = bank.tokens
        n = int((state.get("token_memory") or {}).get("size", -1))
        if n < 0 or not {"token_keys", "token_next", "token_pending"} <= set(arrays):
            raise _corrupt(path, "token memory declared but missing")
        tm_arrays = {"token_keys": tensor("token_keys", tm.dtype, (n, tm.dim)),
                     "token_next": tensor("token_next", torch.int64, (n,)),
                     "token_pending": tensor("token_pending", tm.dtype, (tm.dim,))}
        if "token_basis" in arrays:
            if len(arrays["token_basis"]) % (4 * tm.dim):
                raise _corrupt(path, "token basis of the wrong size")
            # a copy: the basis is kept, and would otherwise keep the file's mapping alive
            tm_arrays["token_basis"] = tensor("token_basis", torch.float32, (tm.dim, -1)).clone()
            width = tm_arrays["token_basis"].shape[1]
            if "token_proj_i8" in arrays:
                if len(arrays["token_proj_i8"]) != n * width or len(arrays.get("token_proj_scale", b"")) != n * 4:
                    raise _corrupt(path, "projected token keys of the wrong size")
                tm_arrays["token_proj_i8"] = tensor("token_proj_i8", torch.int8, (n, width))
                tm_arrays["token_proj_scale"] = tensor("token_proj_scale", torch.float32, (n,))
            elif "token_proj" in arrays:  # files written before int8 projections: rounded on load
                if len(arrays["token_proj"]) != n * width * tm.dtype.itemsize:
                    raise _corrupt(path, "projected token keys of the wrong size")
                tm_arrays["token_proj"] = tensor("token_proj", tm.dtype, (n, width))
            # absent from files written before projections were saved: recomputed
        tm.restore(state["token_memory"], tm_arrays)
    if bank._ivf is not None and "ivf0" in arrays:
        bank._ivf.load_serialized([np.frombuffer(arrays[f"ivf{h}"], dtype=np.uint8) for h in range(H)])
        # a search returns these ids as slots to read: each head must hold exactly the live chunks
        live = np.sort(bank._queue.items().astype(np.int64))
        for h in range(H):
            if not np.array_equal(bank._ivf.ids(h), live):
                raise _corrupt(path, f"IVF index of head {h} does not list the bank's chunks")
    return bank
