"""Backbone features of training segments kept on disk and replayed.

The backbone is frozen and every training segment is encoded on its own (positions from
0, no cache across segments), so what the side network reads of a segment is a function
of its token ids alone. `FeatureCache.encode` stands in for `Backbone.encode` during
training: a row seen before is read back from disk instead of run through the backbone.
It pays when the same segments come back (further epochs over the books, the validation
books at every evaluation, several side-network configurations trained on the same
data); each row costs ~15.7 KB per token on disk for SmolLM2-135M in bfloat16 (docs/results.md
measures the time it saves).

Files are content-addressed (a hash of the row's ids) under one directory whose
`cache.json` records the backbone (name, fingerprint, quantization), the memory layer,
the hidden-state layers kept and the dtype; a directory made for anything else is
refused. A file that cannot be read is encoded again and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from longside.backbone import Backbone, BackboneOutput, feature_quantization
from longside.errors import LongsideError
from longside.paths import atomic_file

log = logging.getLogger(__name__)

_MEMORY_FIELDS = ("memory_keys", "memory_values", "memory_queries", "memory_attn")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class FeatureCache:
    """What the side network reads of each segment row, on disk.

    layers: indices into `BackboneOutput.hidden_states` to keep (the side network's layer
    map, the last state, the token-cache layer); memory_layer: whose keys, values, queries
    and local attention output are kept; max_gb: stop writing new rows beyond this size
    (rows already stored are still read)."""

    def __init__(self, path: str | Path, backbone: Backbone, layers: list[int], memory_layer: int,
                 dtype: str = "bfloat16", max_gb: float = 20.0):
        if dtype not in _DTYPES:
            raise LongsideError(f"feature cache dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.path, self.backbone = Path(path), backbone
        self.layers, self.memory_layer = sorted(set(layers)), memory_layer
        self.dtype, self.max_bytes = _DTYPES[dtype], int(max_gb * 2 ** 30)
        n = backbone.spec.num_layers
        want = {"backbone": backbone.name, "fingerprint": backbone.fingerprint,
                "quantization": feature_quantization(backbone),
                "memory_layer": memory_layer % n, "layers": self.layers, "dtype": dtype}
        manifest = self.path / "cache.json"
        if manifest.exists():
            try:
                have = json.loads(manifest.read_text())
            except (OSError, ValueError) as e:
                raise LongsideError(f"{manifest} is unreadable ({e}); delete the directory {self.path} "
                                    "to start a new feature cache") from e
            if {k: v for k, v in have.items() if k != "layers"} != {k: v for k, v in want.items() if k != "layers"} \
                    or not set(self.layers) <= set(have.get("layers", [])):
                raise LongsideError(f"the feature cache {self.path} was made for {have}, not {want}; "
                                    "choose another directory (or delete this one)")
            self.layers = have["layers"]  # keep what is there, a superset of what is needed
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            with atomic_file(manifest) as tmp:
                tmp.write_text(json.dumps(want, indent=1))
        self.bytes = sum(f.stat().st_size for f in self.path.glob("*/*.safetensors"))
        self.hits = self.misses = self.repaired = self.skipped = 0

    def _file(self, row: torch.Tensor) -> Path:
        digest = hashlib.blake2b(row.to(torch.int64).cpu().numpy().tobytes(), digest_size=16).hexdigest()
        return self.path / digest[:2] / f"{digest}.safetensors"

    def _load(self, f: Path, T: int) -> dict[str, torch.Tensor] | None:
        try:
            t = load_file(str(f))
        except Exception as e:  # truncated or foreign file: encode again
            log.warning("feature cache: %s unreadable (%s); encoding again", f, e)
            self.repaired += 1
            return None
        if any(f"h{i}" not in t for i in self.layers) or any(k not in t for k in _MEMORY_FIELDS) \
                or t[_MEMORY_FIELDS[0]].shape[0] != T:
            self.repaired += 1
            return None
        return t

    def encode(self, input_ids: torch.Tensor) -> BackboneOutput:
        """`Backbone.encode(input_ids [B, T], memory_layer)` from disk where possible.

        `hidden_states` holds float32 tensors `[B, T, d]` at the kept layers and None
        elsewhere; `last_hidden` is not kept (None); memory fields as `encode` returns
        them, float32. Every row is rounded through the cache's dtype, whether it was
        encoded now (and stored) or read back, so training does not depend on what the
        cache held."""
        B, T = input_ids.shape
        files = [self._file(r) for r in input_ids]
        rows: list[dict[str, torch.Tensor] | None] = [self._load(f, T) if f.exists() else None for f in files]
        missing = [b for b in range(B) if rows[b] is None]
        self.hits += B - len(missing)
        self.misses += len(missing)
        if missing:
            out = self.backbone.encode(input_ids[missing].to(self.backbone.device), memory_layer=self.memory_layer)
            for j, b in enumerate(missing):
                # rounded now as on disk: a row reads the same whether encoded or replayed
                fresh = {f"h{i}": out.hidden_states[i][j].to(self.dtype).cpu().contiguous() for i in self.layers}
                fresh.update({k: getattr(out, k)[j].to(self.dtype).cpu().contiguous() for k in _MEMORY_FIELDS})
                rows[b] = fresh
                size = sum(v.numel() for v in fresh.values()) * self.dtype.itemsize
                if self.bytes + size > self.max_bytes:
                    self.skipped += 1
                    continue
                with atomic_file(files[b]) as tmp:
                    save_file(fresh, str(tmp))
                self.bytes += size
        dev = self.backbone.device
        stack = lambda k: torch.stack([r[k] for r in rows]).to(dev, torch.float32)  # noqa: E731
        hidden: list[torch.Tensor | None] = [None] * (self.backbone.spec.num_layers + 1)
        for i in self.layers:
            hidden[i] = stack(f"h{i}")
        return BackboneOutput(hidden_states=hidden, last_hidden=None,
                              **{k: stack(k) for k in _MEMORY_FIELDS})

    def stats(self) -> dict:
        """Rows read back (hits), encoded (misses), re-encoded from bad files, not stored for
        lack of room, and the cache's size in bytes."""
        return {"hits": self.hits, "misses": self.misses, "repaired": self.repaired, "skipped": self.skipped,
                "bytes": self.bytes}


__all__ = ["FeatureCache"]
