"""What a perfect memory read would give: the side network and the backbone fed the
teacher's own change at the memory layer, against what they read now.

    python experiments/oracle_read.py [--model DIR] [--docs 4] [--segments 4] [--layer-sets 15 0-29] [--json PATH]

The teacher is the frozen backbone with the whole document in its window (training/teacher.py).
At the memory layer (block 15 for SmolLM2) it attends to all the earlier text; the student,
one segment at a time, does not. `attn_delta` = o_proj(teacher's attention output) -
o_proj(student's) is exactly what `MemoryReader` is built to add there (its output before
`into_side` is o_proj(A - A_local)), and what the distillation's attn term trains it toward.
Rows, each over segments 2..n of `--docs` documents of `--segments` x 1024 tokens from the
validation books (`--split`), token cache off (the side network alone):

- backbone@1024: the backbone on each segment alone;
- teacher: the backbone with the whole document in view (the bound);
- backbone + oracle at the memory layer: the student backbone with `attn_delta` added to
  block 15's attention output, the frozen blocks above it carrying it on (what a reader in
  the backbone could give, like backbone memory);
- backbone + side's read at the memory layer: the same, with the side network's own reader
  output in place of the teacher's change (a trained reader writing into the backbone);
- with `--backbone-memory X`: backbone memory at blocks X (banks written from the memory-free
  forward), and the same with the memory layer's read replaced by the side reader's output
  (whether a trained reader improves on the training-free one among the others);
- side, memory off / side, memory read / side + oracle read: the side network with no memory,
  with its memory reader over the earlier segments (memory written as in evaluation), and with
  the reader's output replaced by `attn_delta` (what a perfect reader at the same place gives
  the side network as trained).

- backbone + teacher attention at blocks X: the student backbone whose attention outputs
  (after o_proj) at blocks X are replaced by the teacher's. At every block this is the
  teacher itself (the residual stream is the sum of the blocks' outputs and the MLPs act
  per token): a check. At fewer blocks it says how many blocks a reader must read in to
  reach the teacher's gain.

Where the last side row gains little while the backbone rows gain much, the side network,
not the reader, is what throws the read away. CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longside.config import parse_blocks
from longside.eval.common import save_figure
from longside.model import LongSideModel
from longside.nn.backbone_memory import BackboneMemory
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.training.data import book_documents
from longside.training.teacher import TeacherTargets


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token loss of `ids [T]` under `logits [T, V]` (positions 0..T-2 predict 1..T-1)."""
    return float(F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum")), ids.shape[0] - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="side checkpoint (default: the shipped one)")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--layer-sets", nargs="*", default=["15", "7,15,23", "3,7,11,15,19,23,27", "0-14", "15-29",
                                                            "0-29"],
                    help="blocks whose attention output is the teacher's: comma lists and a-b ranges")
    ap.add_argument("--backbone-memory", metavar="BLOCKS",
                    help="also score backbone memory at these blocks (e.g. 15-29), alone and with the memory "
                         "layer's read the side reader's instead of its own")
    ap.add_argument("--split", default="validation", choices=["validation", "test", "unseen"],
                    help="whose books the documents come from (test: Austen, unseen: Moby-Dick)")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="a PNG of the rows' change against backbone@1024")
    ap.add_argument("--replot", metavar="JSON", help="only draw --plot from a report this script wrote")
    args = ap.parse_args()
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    if args.replot:
        if not args.plot:
            ap.error("--replot needs --plot")
        _plot(json.loads(Path(args.replot).read_text())["ppl"], args.plot)
        return
    run = RunRecord.start()
    torch.set_grad_enabled(False)
    model = LongSideModel.from_pretrained(args.model)
    model.drop_token_cache()
    bb, S, layer = model.backbone, 1024, model.config.memory_layer
    L = S * args.segments
    teacher = TeacherTargets(None, bb, window=L, segment=S, top_k=1, memory_layer=layer)
    docs = book_documents(bb, args.split, args.docs, L)
    rows = ["backbone@1024", "teacher", "backbone + oracle at the memory layer",
            "backbone + side's read at the memory layer", "side, memory off",
            "side, memory read", "side + oracle read"]
    tot = {r: [0.0, 0] for r in rows}
    cos: list[float] = []
    o_proj = bb.parts.out_proj(bb.parts.layers[layer])
    projs = [bb.parts.out_proj(block) for block in bb.parts.layers]
    sets = {}
    for text in args.layer_sets:
        sets[f"backbone + teacher attention at blocks {text}"] = parse_blocks(text)
    rows += list(sets)
    tot.update({r: [0.0, 0] for r in sets})
    bm = None
    if args.backbone_memory:
        cfg = model.config
        bm_blocks = parse_blocks(args.backbone_memory)
        bm = BackboneMemory.from_config(bb, dataclasses.replace(cfg, backbone_memory_layers=bm_blocks), 1)
        bm_rows = [f"backbone memory at blocks {args.backbone_memory}",
                   f"backbone memory at blocks {args.backbone_memory}, block {layer}'s read the side reader's"]
        rows += bm_rows
        tot.update({r: [0.0, 0] for r in bm_rows})
    for doc in tqdm(docs, desc="documents"):
        ids = torch.from_numpy(doc)
        target = teacher.document(doc)  # attn_delta [L, d] float16
        t_out: dict[int, torch.Tensor] = {}
        caps = [p.register_forward_hook(lambda _m, _a, o, b=b: t_out.__setitem__(b, o.detach())) for b, p in enumerate(projs)]
        try:
            full = bb.encode(ids[None], memory_layer=layer).hidden_states[-1][0]
        finally:
            for c in caps:
                c.remove()
        model.reset_memory()
        if bm is not None:
            bm.reset()
        for i in range(args.segments):
            seg, delta = ids[i * S:(i + 1) * S], target.attn_delta[i * S:(i + 1) * S].float()[None]
            use = i > 0  # segment 0: nothing earlier to read; scored from segment 1 on
            if use:
                def add(_m, _a, out, d=delta):
                    return out + d
                h = bb.encode(seg[None], memory_layer=layer).hidden_states[-1]
                handle = o_proj.register_forward_hook(add)
                try:
                    h_or = bb.encode(seg[None], memory_layer=layer).hidden_states[-1]
                finally:
                    handle.remove()
                scored = [("backbone@1024", h), ("teacher", full[None, i * S:(i + 1) * S]),
                          ("backbone + oracle at the memory layer", h_or)]
                for row, blocks in sets.items():
                    swaps = [projs[b].register_forward_hook(lambda _m, _a, _o, b=b, i=i: t_out[b][:, i * S:(i + 1) * S])
                             for b in blocks]
                    try:
                        scored.append((row, bb.encode(seg[None], memory_layer=layer).hidden_states[-1]))
                    finally:
                        for w in swaps:
                            w.remove()
                for row, hs in scored:
                    n, k = _nll(bb.lm_head(bb.final_norm(hs))[0], seg)
                    tot[row][0] += n
                    tot[row][1] += k
                out = model(seg[None], labels=seg[None], use_memory=False, write_memory=False, return_logits=False)
                tot["side, memory off"][0] += out.loss.item() * out.n_tokens
                tot["side, memory off"][1] += out.n_tokens
                read: list[torch.Tensor] = []  # the reader's own output, then replaced by the teacher's change
                for row, pre in (("side, memory read", lambda _m, a: read.append(a[0])),
                                 ("side + oracle read", lambda _m, a, d=delta: (d,))):
                    hook = model.side.reader.into_side.register_forward_pre_hook(pre)
                    try:
                        out = model(seg[None], labels=seg[None], use_memory=True, write_memory=False,
                                    return_logits=False)
                    finally:
                        hook.remove()
                    tot[row][0] += out.loss.item() * out.n_tokens
                    tot[row][1] += out.n_tokens
                if read:
                    cos.append(float(F.cosine_similarity(read[0].flatten(), delta.flatten(), dim=0)))
                    handle = o_proj.register_forward_hook(lambda _m, _a, o, r=read[0]: o + r)
                    try:  # the reader's own output where the oracle row puts the teacher's change
                        h_own = bb.encode(seg[None], memory_layer=layer).hidden_states[-1]
                    finally:
                        handle.remove()
                    n, k = _nll(bb.lm_head(bb.final_norm(h_own))[0], seg)
                    tot["backbone + side's read at the memory layer"][0] += n
                    tot["backbone + side's read at the memory layer"][1] += k
                if bm is not None and read:
                    for row, own in zip(bm_rows, (False, True)):
                        scratch = bm.segment()  # never written: the banks hold the earlier segments
                        edits = [e for b in bm_blocks if not (own and b == layer)
                                 for e in bb.edit_attention(b, bm._editor(b, scratch, read=True))]
                        if own:  # the reader read from the memory-free forward, as in the row above
                            edits.append(o_proj.register_forward_hook(lambda _m, _a, o, r=read[0]: o + r))
                        try:
                            hs = bb.encode(seg[None]).hidden_states[-1]
                        finally:
                            for e in edits:
                                e.remove()
                        n, k = _nll(bb.lm_head(bb.final_norm(hs))[0], seg)
                        tot[row][0] += n
                        tot[row][1] += k
            if bm is not None:  # backbone memory's banks: this segment's keys from the memory-free forward
                wseg = bm.segment()
                with bm.attach(wseg, read=False):
                    bb.encode(seg[None])
                bm.write(wseg)
            model(seg[None], use_memory=use, write_memory=True, return_logits=False)  # write it, as evaluation does
    ppl = {r: math.exp(v[0] / v[1]) for r, v in tot.items()}
    base = ppl["backbone@1024"]
    for r in rows:
        print(f"{r:60s} {ppl[r]:8.3f}  {100 * (ppl[r] / base - 1):+6.2f}% vs backbone@1024")
    print(f"cosine(reader's output, teacher's change), mean over segments: {np.mean(cos):.3f}")
    if args.json:
        write_json({"ppl": ppl, "tokens": tot[rows[0]][1], "docs": len(docs), "segments": args.segments,
                    "split": args.split,
                    "reader_cosine_mean": float(np.mean(cos)) if cos else None,
                    "layer_sets": {r: b for r, b in sets.items()}, "model": args.model or "shipped",
                    "run": run.finish()}, args.json)
    if args.plot:
        _plot(ppl, args.plot)


def _plot(ppl: dict, path: str) -> None:
    """One bar per row: its perplexity change against backbone@1024 (%), the teacher's as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = ppl["backbone@1024"]
    rows = [r for r in ppl if r not in ("backbone@1024", "teacher") and "blocks 0-" not in r]
    labels = [r.replace("backbone + teacher attention at blocks ", "teacher attn @ ") for r in rows]
    change = [100 * (ppl[r] / base - 1) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.5))
    ax.barh(range(len(rows)), change, color=["tab:orange" if "side" in r else "tab:blue" for r in rows])
    ax.axvline(100 * (ppl["teacher"] / base - 1), color="k", ls="--", label="teacher (whole document in view)")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity vs backbone@1024 (%)")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("what a perfect memory read is worth, by where it is read")
    save_figure(plt, fig, path)


if __name__ == "__main__":
    main()
