"""Train backbone memory's query maps against the long-context teacher, block by block.

Backbone memory (nn/backbone_memory.py) lets blocks of the frozen backbone read their own
old keys/values; every block above carries what a read adds to the output, which is why a
read there is worth far more than the same read handed to the side network
(docs/results.md#read-transport). Untrained, each block searches and scores memory with
its own query. A query map `A [H, D, D]` per block (zero: untrained) changes that query,
and so which memory is found and how much weight it gets against the local window.

The target is local to each block: the teacher, the same frozen backbone with the whole
document in its window, gives block L's attention output (after o_proj) for every token;
the student reads the document one segment at a time, its earlier segments in memory. For
block L the loss is

    |o(a'_L) - o(t_L)|^2 / |o(a_L) - o(t_L)|^2      summed over the segment's tokens

where a_L is the block's local attention, a'_L the same after its memory read (the map's
only way in) and t_L the teacher's: the share of the teacher's change the read leaves
unexplained (1: as if memory were off; below 1: closer to the teacher). Each block's loss is
taken and back-propagated inside that block's read, on inputs the backbone computed under
`no_grad`, so no gradient ever passes through the backbone, and the blocks train in one
forward that feeds every block's read to the blocks above, as inference does. Memory is
written from that same forward, as `Memory` writes it.

With `loss="output"` the maps are fitted to the output instead: the KL divergence from the
teacher's next-token distribution plus the next-token loss, over the tokens a window scores.
Its gradient reaches each map through the frozen blocks above its block (their weights get
none), so a map learns what the blocks make of its read, not only how close the read comes to
the teacher's attention: the objective perplexity measures, at the cost of a backward through
the upper blocks and the LM head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longside.backbone import Backbone
from longside.errors import LongsideError
from longside.memory import segment_starts
from longside.nn.backbone_memory import BackboneMemory


@dataclass
class QueryMapConfig:
    """What `train_query_maps` fits: blocks, documents of `segments` x `segment` tokens
    (the teacher sees each whole) read in windows of `segment` tokens as a model with
    `window_carry = carry` reads them (`carry_for` of its config), optimiser. Backbone memory's own settings (k_chunks,
    distance, chunk size) come from the model's config, as inference reads it."""

    blocks: list[int] = field(default_factory=lambda: list(range(15, 30)))
    segment: int = 1024
    segments: int = 4
    carry: int = 0  # each window after the first starts with the last `carry` tokens of the one before
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 1
    loss: str = "block"  # "block": each block's read against the teacher's attention there; "output": KL + next-token loss


def teacher_output(backbone: Backbone, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's normed last hidden state `[N, d]` float32 for one document `ids [N]` read
    whole (N must fit the backbone's context): its next-token distribution, `lm_head` away."""
    if ids.shape[0] > backbone.spec.max_positions:
        raise LongsideError(f"a teacher document of {ids.shape[0]} tokens exceeds the backbone's context of "
                            f"{backbone.spec.max_positions}; use fewer or shorter segments")
    return backbone.encode(ids[None].to(backbone.device)).last_hidden[0].float()


def teacher_attention(backbone: Backbone, ids: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """The teacher's attention outputs after o_proj at `blocks`, each `[N, d]` float32, for
    one document `ids [N]` read whole (N must fit the backbone's context)."""
    if ids.shape[0] > backbone.spec.max_positions:
        raise LongsideError(f"a teacher document of {ids.shape[0]} tokens exceeds the backbone's context of "
                            f"{backbone.spec.max_positions}; use fewer or shorter segments")
    out: dict[int, torch.Tensor] = {}
    hooks = [backbone.parts.out_proj(backbone.parts.layers[b]).register_forward_hook(
        lambda _m, _a, o, b=b: out.__setitem__(b, o[0].detach().float())) for b in blocks]
    try:
        backbone.encode(ids[None].to(backbone.device))
    finally:
        for h in hooks:
            h.remove()
    return out


def train_query_maps(backbone: Backbone, model_config, docs: Sequence[np.ndarray], config: QueryMapConfig,
                     maps: dict[int, torch.Tensor] | None = None, progress: bool = True):
    """Fit one query map per block of `config.blocks` on `docs` (token ids, each
    `segments * segment` long), starting from `maps` (default zero). Returns (maps
    `{block: [H, D, D] float32}`, history: one dict per document with each block's mean loss
    over the segments that read memory, or with `loss="output"` its mean "kl" and "ce" per
    scored token)."""
    spec = backbone.spec
    S, n = config.segment, config.segments
    shape = (spec.num_heads, spec.head_dim, spec.head_dim)
    if not 0 <= config.carry < S:
        raise LongsideError(f"carry must be 0..{S - 1} tokens of a {S}-token window, got {config.carry}")
    if config.loss not in ("block", "output"):
        raise LongsideError(f"query map loss must be 'block' or 'output', got {config.loss!r}")
    dev = backbone.device
    params = {b: torch.nn.Parameter(maps[b].detach().float().to(dev).clone() if maps and b in maps
                                    else torch.zeros(shape, device=dev)) for b in config.blocks}
    opt = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    history = []
    bar = tqdm(total=len(docs) * config.epochs, desc="query maps", disable=not progress)
    for _ in range(config.epochs):
        for doc in docs:
            ids = torch.as_tensor(np.asarray(doc, dtype=np.int64))
            if ids.shape[0] != S * n:
                raise LongsideError(f"a training document must be {n} segments of {S} tokens, got {ids.shape[0]}")
            bm = BackboneMemory.from_config(backbone, dataclasses.replace(model_config, backbone_memory_layers=config.blocks), 1)
            if config.loss == "output":
                history.append(_fit_output(backbone, bm, ids, config, params, opt))
                bar.update(1)
                bar.set_postfix(kl=f"{history[-1]['kl']:.3f}")
                continue
            target = teacher_attention(backbone, ids, config.blocks)
            losses: dict[int, list[float]] = {b: [] for b in config.blocks}
            for j, a in enumerate(segment_starts(len(ids), S, config.carry)):
                first = config.carry if j else 0  # read again, already in memory
                seg = bm.segment()
                edits = [h for b in config.blocks
                         for h in backbone.edit_attention(b, _training_edit(bm, b, seg, params[b],
                                                                            target[b][a:a + S], losses[b], first))]
                opt.zero_grad(set_to_none=True)
                try:
                    backbone.encode(ids[None, a:a + S].to(backbone.device))
                finally:
                    for h in edits:
                        h.remove()
                if j:
                    opt.step()
                bm.write(seg, skip=first)
            history.append({b: float(np.mean(v)) for b, v in losses.items() if v})
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean([np.mean(v) for v in losses.values() if v]):.3f}")
    bar.close()
    return {b: p.detach().clone() for b, p in params.items()}, history


def _fit_output(backbone: Backbone, bm: BackboneMemory, ids: torch.Tensor, config: QueryMapConfig,
                params: dict[int, torch.nn.Parameter], opt: torch.optim.Optimizer) -> dict[str, float]:
    """One document, `loss="output"`: a step per window that reads memory, on the KL from the
    teacher's next-token distribution plus the next-token loss over the window's scored tokens
    (from `carry` on after the first, as `eval ppl` scores). -> mean {"kl", "ce"} per token."""
    S, N = config.segment, ids.shape[0]
    teacher = teacher_output(backbone, ids)
    ids = ids.to(backbone.device)
    sums = {"kl": 0.0, "ce": 0.0, "n": 0}
    for j, a in enumerate(segment_starts(N, S, config.carry)):
        first = config.carry if j else 0
        win = ids[None, a:a + S]
        seg = bm.segment()
        end = min(win.shape[1], N - 1 - a)  # positions with a next token
        # the first window has no memory to read; a last one holding only carried tokens has nothing
        # to score (a mean of none is NaN): both are only written
        if j == 0 or end <= first:
            with bm.attach(seg, read=False):
                backbone.encode(win)
            bm.write(seg, skip=first)
            continue
        opt.zero_grad(set_to_none=True)
        edits: list = []
        try:
            for b in config.blocks:
                edits += backbone.edit_attention(b, _output_edit(bm, b, seg, params[b]))
            with torch.enable_grad():
                # the Hugging Face forward itself, with grad: `encode` runs under no_grad
                hidden = backbone.parts.base(input_ids=win, use_cache=False).last_hidden_state[0, first:end]
                logp = F.log_softmax(backbone.lm_head(hidden).float(), -1)
                with torch.no_grad():
                    logq = F.log_softmax(backbone.lm_head(teacher[a + first:a + end].to(hidden.dtype)).float(), -1)
                kl = (logq.exp() * (logq - logp)).sum(-1).mean()
                ce = F.nll_loss(logp, ids[a + first + 1:a + end + 1])
                (kl + ce).backward()
        finally:
            for h in edits:
                h.remove()
        opt.step()
        bm.write(seg, skip=first)
        sums["kl"] += float(kl.detach()) * (end - first)
        sums["ce"] += float(ce.detach()) * (end - first)
        sums["n"] += end - first
    n = max(sums.pop("n"), 1)
    return {k: v / n for k, v in sums.items()}


def _output_edit(bm: BackboneMemory, L: int, seg, A: torch.nn.Parameter):
    """Block L's edit for `loss="output"`: read memory with map `A` and hand the read on with
    its graph, so the loss at the output reaches `A` through the blocks above. Keys and values
    are recorded without one: memory is data, written after the step (so the window's own keys
    pass no gradient into the read's weight against the window: a slightly truncated gradient)."""
    def edit(kv: dict) -> torch.Tensor | None:
        window_kr = bm.record_tokens(L, seg, kv["k"].detach(), kv["v"].detach())
        return bm.read(L, seg.rows, kv["q"], window_kr, kv["a"], A=A)
    return edit


@torch.no_grad()
def block_memory_nll(backbone: Backbone, model_config, docs: Sequence[np.ndarray], blocks: Sequence[int],
                     maps: dict[int, torch.Tensor] | None, segment: int = 1024, carry: int = 0,
                     progress: bool = True) -> dict:
    """The frozen backbone alone (no side network, no token cache) over `docs`, in windows of
    `segment` tokens, each after the first starting with the last `carry` of the one before
    (as `eval ppl` reads a text): summed next-token loss of every token past the first window,
    with memory off ("off") and with backbone memory at `blocks` read with `maps` ("memory";
    None: untrained), memory written from the reading forward as `Memory` writes it.
    -> {"off": [nll, n], "memory": [nll, n]}."""
    if not 0 <= carry < segment:
        raise LongsideError(f"carry must be 0..{segment - 1} tokens of a {segment}-token window, got {carry}")
    tot = {"off": [0.0, 0], "memory": [0.0, 0]}
    head = lambda out: backbone.lm_head(out.last_hidden)[0].float()  # noqa: E731
    for doc in tqdm(docs, desc="scoring", disable=not progress):
        ids = torch.as_tensor(np.asarray(doc, dtype=np.int64)).to(backbone.device)
        bm = BackboneMemory.from_config(backbone, dataclasses.replace(model_config, backbone_memory_layers=list(blocks)), 1, maps)
        for j, a in enumerate(segment_starts(len(ids) - 1, segment, carry)):
            first = carry if j else 0
            win = ids[None, a:a + segment]
            seg = bm.segment()
            with bm.attach(seg, read=j > 0):
                out = backbone.encode(win)
            bm.write(seg, skip=first)
            if j == 0:
                continue
            targets = ids[a + 1 + first:a + 1 + win.shape[1]]
            for row, o in (("memory", out), ("off", backbone.encode(win))):
                logits = head(o)[first:first + len(targets)]
                tot[row][0] += float(F.cross_entropy(logits, targets, reduction="sum"))
                tot[row][1] += len(targets)
    return tot


def _training_edit(bm: BackboneMemory, L: int, seg, A: torch.nn.Parameter, target: torch.Tensor, losses: list,
                   first: int = 0):
    """Block L's edit during training: record the tokens, read memory with map `A`, take the
    block's local loss against the teacher's `target [T, d]` over the window's tokens from
    `first` on (a carried window's first tokens are scored by the window before: their
    errors, the largest of the window, would otherwise set the map) and back-propagate it into `A`."""
    backbone = bm.backbone
    o_proj = backbone.parts.out_proj(backbone.parts.layers[L]).forward  # not __call__: the block's hooks read its input

    def edit(kv: dict) -> torch.Tensor | None:
        q, a = kv["q"], kv["a"]
        window_kr = bm.record_tokens(L, seg, kv["k"], kv["v"])
        with torch.enable_grad():
            edited = bm.read(L, seg.rows, q, window_kr, a, A=A)
            if edited is None:  # nothing in memory yet
                return None
            t = target[first:].to(a.device)
            base = ((o_proj(a.flatten(2)[0, first:]) - t) ** 2).sum()
            loss = ((o_proj(edited.flatten(2)[0, first:]) - t) ** 2).sum() / base.clamp_min(1e-6)
            loss.backward()
        losses.append(float(loss))
        return edited.detach()
    return edit


__all__ = ["QueryMapConfig", "block_memory_nll", "teacher_attention", "teacher_output", "train_query_maps"]
