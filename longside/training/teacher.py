"""Teacher targets: what the frozen backbone says with the far past in its own window.

The student (backbone + side network) sees one segment of `segment` tokens at a time and
the earlier segments of the document only through memory. The same frozen backbone run
over the whole document (up to its native context, `window` tokens) is a teacher for
exactly what memory should add: for every token, its final state and next-token
distribution with all the preceding text in view. Per token of a document we keep

    delta    [L, d]  float16: final_norm(h_N teacher) - final_norm(h_N student)
    top_ids  [L, k]  int32:   the teacher's k most likely next tokens
    top_logp [L, k]  float32: their log-probabilities
    attn_delta [L, d] float16: at the memory layer, o_proj(attention output teacher) -
                      o_proj(attention output student): what memory attention itself
                      should add there (`MemoryReader` adds o_proj(A - A_local))

where the student's h_N is the backbone over the token's own segment alone (what the side
network's residual is added to). The normalised space (after the final RMSNorm, before the
LM head) is the one the logits see; it keeps the backbone's few huge hidden dimensions
from dominating the regression.

A document must fit the teacher's window and be whole segments, so every segment's
teacher sees the entire document before it, and memory (written segment by segment)
holds exactly that text. Files are content-addressed by the document's ids under one
directory whose `teacher.json` records the backbone (name, fingerprint, quantization),
window, segment, k, memory layer and format; a directory made for anything else is
refused. An unreadable file is computed again. A document of 8192 tokens takes about 20 MB
(SmolLM2); synthetic documents rarely recur, so the directory grows with the documents a
run sees (`du` it; delete it freely: it is only a cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from longside.backbone import Backbone, feature_quantization
from longside.errors import LongsideError
from longside.paths import atomic_file

log = logging.getLogger(__name__)

_FORMAT = "longside-teacher-v2"
_FIELDS = ("delta", "top_ids", "top_logp", "attn_delta")


@dataclass
class DocumentTargets:
    """Teacher targets of one document (see the module docstring for shapes and dtypes)."""

    delta: torch.Tensor
    top_ids: torch.Tensor
    top_logp: torch.Tensor
    attn_delta: torch.Tensor

    def segment(self, i: int, size: int) -> "DocumentTargets":
        """The targets of segment `i` (tokens `i*size .. (i+1)*size-1`)."""
        s = slice(i * size, (i + 1) * size)
        return DocumentTargets(self.delta[s], self.top_ids[s], self.top_logp[s], self.attn_delta[s])


def stack_targets(rows: list[DocumentTargets], device: torch.device | str = "cpu") -> DocumentTargets:
    """Batch rows of equal length: `[B, T, ...]` tensors, the deltas as float32."""
    return DocumentTargets(torch.stack([r.delta for r in rows]).to(device, torch.float32),
                           torch.stack([r.top_ids for r in rows]).to(device, torch.int64),
                           torch.stack([r.top_logp for r in rows]).to(device, torch.float32),
                           torch.stack([r.attn_delta for r in rows]).to(device, torch.float32))


class TeacherTargets:
    """Teacher targets of whole documents, computed once and kept on disk.

    window: the teacher's context in tokens (at most the backbone's native one); segment:
    the student's segment length; top_k: next tokens kept per position. `student_encode`
    (default `backbone.encode`) gives the student's features of one segment, so a
    FeatureCache can stand in and be filled at the same time. `path` None keeps nothing on
    disk: every document is computed when asked for (a GPU computes one faster than a disk
    holding ~20 MB per document would pay back, on a run that rarely sees one twice)."""

    def __init__(self, path: str | Path | None, backbone: Backbone, window: int, segment: int, top_k: int = 16,
                 memory_layer: int = 15, student_encode: Callable | None = None):
        if window > backbone.spec.max_positions:
            raise LongsideError(f"teacher window {window} exceeds the backbone's native context "
                                f"{backbone.spec.max_positions}")
        if window < segment or window % segment:
            raise LongsideError(f"the teacher window ({window}) must be a multiple of the segment ({segment})")
        if top_k < 1:
            raise LongsideError(f"top_k must be >= 1, got {top_k}")
        self.path, self.backbone = (Path(path) if path is not None else None), backbone
        self.window, self.segment, self.top_k = window, segment, top_k
        self.memory_layer = memory_layer % backbone.spec.num_layers
        self.student_encode = student_encode or (lambda ids: backbone.encode(ids, memory_layer=self.memory_layer))
        self.hits = self.misses = self.repaired = 0
        if self.path is None:
            return
        want = {"format": _FORMAT, "backbone": backbone.name, "fingerprint": backbone.fingerprint,
                "quantization": feature_quantization(backbone),
                "window": window, "segment": segment, "top_k": top_k, "memory_layer": self.memory_layer}
        manifest = self.path / "teacher.json"
        if manifest.exists():
            try:
                have = json.loads(manifest.read_text())
            except (OSError, ValueError) as e:
                raise LongsideError(f"{manifest} is unreadable ({e}); delete {self.path} to start anew") from e
            if have != want:
                raise LongsideError(f"the teacher targets in {self.path} were made for {have}, not {want}; "
                                    "choose another directory (or delete this one)")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            with atomic_file(manifest) as tmp:
                tmp.write_text(json.dumps(want, indent=1))

    def _file(self, ids: np.ndarray) -> Path:
        digest = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest()
        return self.path / digest[:2] / f"{digest}.safetensors"

    def document(self, ids: np.ndarray | torch.Tensor) -> DocumentTargets:
        """Targets of a document `ids [L]` (L a multiple of the segment, <= window), from
        disk where they were computed before."""
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        L = len(ids)
        if L == 0 or L % self.segment or L > self.window:
            raise LongsideError(f"a document for teacher targets must be whole segments of {self.segment} tokens "
                                f"and at most the teacher window {self.window}; got {L} tokens")
        if self.path is None:
            self.misses += 1
            return self.compute(torch.from_numpy(ids))
        f = self._file(ids)
        if f.exists():
            try:
                t = load_file(str(f))
                if all(k in t for k in _FIELDS) and t["delta"].shape[0] == L and t["top_ids"].shape[1] == self.top_k:
                    self.hits += 1
                    return DocumentTargets(*(t[k] for k in _FIELDS))
            except Exception as e:  # truncated or foreign file: compute again
                log.warning("teacher targets: %s unreadable (%s); computing again", f, e)
            self.repaired += 1
        self.misses += 1
        targets = self.compute(torch.from_numpy(ids))
        with atomic_file(f) as tmp:
            save_file({k: getattr(targets, k).contiguous() for k in _FIELDS}, str(tmp))
        return targets

    @torch.no_grad()
    def compute(self, ids: torch.Tensor, block: int = 1024) -> DocumentTargets:
        """Run the teacher over `ids [L]` and the student's backbone over each segment."""
        bb, S, L, layer = self.backbone, self.segment, ids.shape[0], self.memory_layer
        dev = bb.device
        out = bb.encode(ids[None].to(dev), memory_layer=layer)  # the whole document in view
        teacher = out.hidden_states[-1][0]  # [L, d]
        t_attn = bb.attn_output(layer, out.memory_attn[0].flatten(-2).float())  # [L, d]
        delta = torch.empty(L, teacher.shape[-1], dtype=torch.float16)
        attn_delta = torch.empty_like(delta)
        top_ids = torch.empty(L, self.top_k, dtype=torch.int32)
        top_logp = torch.empty(L, self.top_k, dtype=torch.float32)
        for i in range(0, L, S):
            st = self.student_encode(ids[None, i:i + S].to(dev))
            student = st.hidden_states[-1][0].float()
            delta[i:i + S] = (bb.final_norm(teacher[i:i + S].float()) - bb.final_norm(student)).half().cpu()
            s_attn = bb.attn_output(layer, st.memory_attn[0].flatten(-2).float())
            attn_delta[i:i + S] = (t_attn[i:i + S] - s_attn).half().cpu()
        for i in range(0, L, block):
            logp = F.log_softmax(bb.lm_head(bb.final_norm(teacher[i:i + block].float())).float(), -1)
            v, k = logp.topk(self.top_k, -1)
            top_logp[i:i + block], top_ids[i:i + block] = v.cpu(), k.to(torch.int32).cpu()
        return DocumentTargets(delta, top_ids, top_logp, attn_delta)

    def stats(self) -> dict:
        """Documents read back (hits), computed (misses) and recomputed from bad files."""
        return {"hits": self.hits, "misses": self.misses, "repaired": self.repaired}


def distill_terms(backbone: Backbone, h: torch.Tensor, base: torch.Tensor, targets: DocumentTargets,
                  memory_read: torch.Tensor | None = None, local_attn: torch.Tensor | None = None,
                  block: int = 256) -> dict[str, torch.Tensor]:
    """The distillation losses of one batch of segments.

    h `[B, T, d]`: the side network's output (final states before the norm); base
    `[B, T, d]`: the backbone's own h_N over the segment; targets: `[B, T, ...]`
    (`stack_targets`). Returns float32 scalars:

    mse: sum ||norm(h) - norm(base) - delta||^2 / sum ||delta||^2, the share of the long
         context's change the side network has not yet made (1 at initialisation, when
         h == base, wherever the floor below does not apply; 0 when it matches the teacher). The denominator is at least 1% of
         sum ||norm(base)||^2: a document's first segment, whose teacher sees no more than
         the student (delta ~ 0), then asks the residual to stay small instead of dividing
         by nothing (elsewhere ||delta||^2 is ~5% of it for SmolLM2 at 8k);
    kl:  mean over tokens of KL(teacher || student) on k+1 bins (the teacher's top k
         tokens and the rest), 0 when the distributions agree;
    attn (only with `memory_read [B, T, d]`, what memory attention added at the memory
         layer before it enters the side stream, and `local_attn [B, T, d]`, that layer's
         own o_proj(attention output)): sum ||memory_read - attn_delta||^2 /
         max(sum ||attn_delta||^2, 1% of sum ||local_attn||^2), the same share at the
         memory layer itself.
    """
    B, T, _ = h.shape
    num, den, floor, kl = h.new_zeros(()), h.new_zeros(()), h.new_zeros(()), h.new_zeros(())
    for i in range(0, T, block):
        j = min(i + block, T)
        hn, bn = backbone.final_norm(h[:, i:j]), backbone.final_norm(base[:, i:j])
        d = targets.delta[:, i:j]
        num = num + (hn - bn - d).pow(2).sum()
        den = den + d.pow(2).sum()
        floor = floor + 0.01 * bn.detach().pow(2).sum()
        logits = backbone.lm_head(hn).float()
        lse = logits.logsumexp(-1)
        top = targets.top_ids[:, i:j]
        logp = logits.gather(-1, top) - lse[..., None]  # [B, t, k]
        # the rest bin from the logits left out, not 1 - sum: exact where the top k hold ~all
        log_rest_s = logits.scatter(-1, top, float("-inf")).logsumexp(-1) - lse
        lt = targets.top_logp[:, i:j]
        pt = lt.exp()
        log_rest_t = torch.log1p(-pt.sum(-1).clamp_max(1 - 1e-7))
        kl = kl + (pt * (lt - logp)).sum() + (log_rest_t.exp() * (log_rest_t - log_rest_s)).sum()
    terms = {"mse": num / torch.maximum(den, floor), "kl": kl / (B * T)}
    if memory_read is not None and local_attn is not None:
        d = targets.attn_delta
        floor = 0.01 * local_attn.detach().pow(2).sum()
        terms["attn"] = (memory_read - d).pow(2).sum() / torch.maximum(d.pow(2).sum(), floor)
    return terms


__all__ = ["DocumentTargets", "TeacherTargets", "distill_terms", "stack_targets"]
