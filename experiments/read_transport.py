"""Can a side path carry a perfect memory read to the output without the backbone's blocks?

    python experiments/read_transport.py [--fit-docs 24] [--docs 4] [--segments 4] [--layer-sets 20 15-29] [--json PATH]

Session 43 found that the teacher's attention output at one block (a perfect read), carried
to the output by the frozen blocks above, is worth -4.3% perplexity at block 20, and five
such reads -8.8%; the trained side network makes ~2% of a perfect read. A side network has
no gradient through those blocks. This asks how much of a read survives a *linear* map from
each block's read straight to the backbone's last hidden state: the simplest transport a
side network can learn. Per token and block b, the read is

    delta_b = o_proj(teacher's attention output at b) - o_proj(the 1024-window's)   [d]

and the target is the change the teacher makes to the last hidden state, h_N(teacher) -
h_N(window) [d]. For each block set S, a ridge regression fits W_S [|S| d, d] on documents
from the training books; the student is then final_norm(h_N + [delta_b for b in S] W_S)
through the LM head. Rows, over segments 2..n of documents of `--segments` x 1024 tokens,
token cache and side network off (the backbone alone):

- backbone@1024, teacher (the bound);
- backbone + teacher attention at blocks S: the perfect read carried by the frozen blocks
  (session 43);
- backbone memory at blocks S: its own reads carried by the blocks (fed back, as it runs);
- residual carry of perfect reads at S: h_N + sum_b delta_b, no map;
- linear transport of perfect / own reads at S: h_N + delta W_S, W_S fitted to that kind of
  read, where an own read is what backbone memory's block b reads in the memory-free forward,
  o_proj(edited - local attention), not fed back;
- perfect-read map on own reads at S: the map fitted to perfect reads, given own ones.

Every map row is scored for each `--ridge` weight; the one chosen per row on the validation
documents is reported (`chosen`) for both the validation and the test (Austen) documents.

CPU: a few minutes per ten documents.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

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

S = 1024


def _documents(bb, split: str, n: int, length: int) -> list[torch.Tensor]:
    return [torch.from_numpy(d) for d in book_documents(bb, split, n, length)]


def _reads(bb, bm: BackboneMemory, doc: torch.Tensor, segments: int, blocks: list[int]):
    """Per scored segment i >= 1: (window h_N [S, d], teacher h_N [S, d], {b: perfect read [S, d]},
    {b: own read [S, d]}, {b: teacher o_proj output [S, d]}), all float32. The own read is what
    backbone memory's block b reads from the earlier segments (`bm`, written here segment by
    segment), o_proj(edited - local attention), computed in the memory-free forward and not fed
    back: the backbone's states are the window's."""
    projs = [bb.parts.out_proj(block) for block in bb.parts.layers]
    out: dict[int, torch.Tensor] = {}
    own: dict[int, torch.Tensor] = {}

    def grab(b):
        return lambda _m, _a, o: out.__setitem__(b, o.detach()[0].float())

    def observe(b, edit):
        def hook(kv):
            new = edit(kv)
            # forward(), not __call__: the projection's hooks (this one's included) must not run again
            own[b] = (torch.zeros(kv["a"].shape[1], bb.spec.hidden_size) if new is None
                      else projs[b].forward((new - kv["a"]).flatten(2))[0].float())
            return None  # read, but leave the block's output as it was
        return hook
    bm.reset()
    hooks = [projs[b].register_forward_hook(grab(b)) for b in blocks]
    try:
        full = bb.encode(doc[None]).hidden_states[-1][0].float()
        t_out = dict(out)
        for i in range(segments):
            seg, part = bm.segment(), slice(i * S, (i + 1) * S)
            edits = [h for b in blocks for h in bb.edit_attention(b, observe(b, bm._editor(b, seg, read=True)))]
            try:
                h = bb.encode(doc[None, part]).hidden_states[-1][0].float()
            finally:
                for e in edits:
                    e.remove()
            if i:  # before this segment enters memory: a row that reads memory now must not see it
                yield (h, full[part], {b: t_out[b][part] - out[b] for b in blocks}, dict(own),
                       {b: t_out[b][part] for b in blocks})
            bm.write(seg)
    finally:
        for k in hooks:
            k.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit-docs", type=int, default=24, help="documents from the training books to fit the maps")
    ap.add_argument("--docs", type=int, default=4, help="documents scored per split (validation, test)")
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--layer-sets", nargs="*", default=["20", "29", "17,20,23,26,29", "15-29"])
    ap.add_argument("--ridge", nargs="*", type=float, default=[1e-2, 1e-1, 1.0, 10.0],
                    help="ridge weights, relative to the mean diagonal of X'X; one chosen per row on validation")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="a PNG: per block set, each row's change against backbone@1024, both splits")
    ap.add_argument("--replot", metavar="JSON", help="only draw --plot from a report this script wrote")
    args = ap.parse_args()
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    if args.replot:
        if not args.plot:
            ap.error("--replot needs --plot")
        _plot(json.loads(Path(args.replot).read_text()), args.plot)
        return
    run = RunRecord.start()
    torch.set_grad_enabled(False)
    model = LongSideModel.from_pretrained()  # the shipped checkpoint's backbone and memory settings
    bb, cfg = model.backbone, model.config
    sets = {t: parse_blocks(t) for t in args.layer_sets}
    union = sorted({b for bs in sets.values() for b in bs})
    L, d = S * args.segments, bb.spec.hidden_size
    bm = BackboneMemory.from_config(bb, dataclasses.replace(cfg, backbone_memory_layers=union), 1)
    score = lambda h, ids: float(F.cross_entropy(bb.lm_head(bb.final_norm(h[None]))[0, :-1].float(), ids[1:],
                                                  reduction="sum"))
    kinds = ("perfect", "own")

    # 1. normal equations per set and kind of read over the training documents
    xtx = {(t, k): torch.zeros(len(bs) * d, len(bs) * d, dtype=torch.float64) for t, bs in sets.items() for k in kinds}
    xty = {(t, k): torch.zeros(len(bs) * d, d, dtype=torch.float64) for t, bs in sets.items() for k in kinds}
    for doc in tqdm(_documents(bb, "train", args.fit_docs, L), desc="fit documents"):
        for h, full, perfect, own, _ in _reads(bb, bm, doc, args.segments, union):
            y = full - h
            for t, bs in sets.items():
                for k, read in zip(kinds, (perfect, own)):
                    x = torch.cat([read[b] for b in bs], dim=1)  # float32 products, float64 sums
                    xtx[t, k] += (x.T @ x).double()
                    xty[t, k] += (x.T @ y).double()
    maps = {}
    for key in list(xtx):
        a = xtx.pop(key)
        scale = float(a.diagonal().mean())
        eye = torch.eye(a.shape[0], dtype=torch.float64)
        maps[key] = {r: torch.linalg.solve(a + r * scale * eye, xty[key]).float() for r in args.ridge}
    del xty

    # 2. score the validation and test documents
    projs = [bb.parts.out_proj(block) for block in bb.parts.layers]
    report: dict = {}
    for split in ("validation", "test"):
        rows: dict[str, float] = {}
        n_tok = 0

        def add(row, nll):
            rows[row] = rows.get(row, 0.0) + nll
        for doc in tqdm(_documents(bb, split, args.docs, L), desc=f"{split} documents"):
            for i, (h, full, perfect, own, t_out) in enumerate(_reads(bb, bm, doc, args.segments, union), start=1):
                ids = doc[i * S:(i + 1) * S]
                n_tok += S - 1
                add("backbone@1024", score(h, ids))
                add("teacher", score(full, ids))
                for t, bs in sets.items():
                    swaps = [projs[b].register_forward_hook(lambda _m, _a, _o, b=b: t_out[b][None]) for b in bs]
                    try:
                        add(f"backbone + teacher attention at blocks {t}",
                            score(bb.encode(ids[None]).hidden_states[-1][0].float(), ids))
                    finally:
                        for w in swaps:
                            w.remove()
                    scratch = bm.segment()  # never written: the bank stays the earlier segments
                    edits = [e for b in bs for e in bb.edit_attention(b, bm._editor(b, scratch, read=True))]
                    try:
                        add(f"backbone memory at blocks {t}", score(bb.encode(ids[None]).hidden_states[-1][0].float(), ids))
                    finally:
                        for e in edits:
                            e.remove()
                    add(f"residual carry of perfect reads at {t}", score(h + sum(perfect[b] for b in bs), ids))
                    for k, read in zip(kinds, (perfect, own)):
                        x = torch.cat([read[b] for b in bs], dim=1)
                        for r, W in maps[t, k].items():
                            add(f"linear transport of {k} reads at {t} (ridge {r:g})", score(h + x @ W, ids))
                    for r, W in maps[t, "perfect"].items():  # the map fitted to perfect reads, fed own reads
                        x = torch.cat([own[b] for b in bs], dim=1)
                        add(f"perfect-read map on own reads at {t} (ridge {r:g})", score(h + x @ W, ids))
        report[split] = {"ppl": {r: math.exp(v / n_tok) for r, v in rows.items()}, "tokens": n_tok}
    # one ridge weight per row: the best on validation, the same row reported on test
    val = report["validation"]["ppl"]
    chosen = {}
    for r in val:
        if " (ridge " in r:
            base = r.split(" (ridge ")[0]
            if base not in chosen or val[r] < val[f"{base} (ridge {chosen[base]:g})"]:
                chosen[base] = float(r.split(" (ridge ")[1].rstrip(")"))
    for split in ("validation", "test"):
        ppl = report[split]["ppl"]
        report[split]["chosen"] = {b: ppl[f"{b} (ridge {r:g})"] for b, r in chosen.items()}
        base = ppl["backbone@1024"]
        print(f"--- {split} ({report[split]['tokens']} tokens)")
        for r, v in ppl.items():
            if " (ridge " in r and not r.endswith(f"(ridge {chosen[r.split(' (ridge ')[0]]:g})"):
                continue
            print(f"{r:66s} {v:8.3f}  {100 * (v / base - 1):+6.2f}%")
    if args.json:
        write_json({**report, "ridge_chosen": chosen, "fit_docs": args.fit_docs, "docs": args.docs,
                    "segments": args.segments, "layer_sets": sets, "run": run.finish()}, args.json)
    if args.plot:
        _plot({**report, "layer_sets": sets}, args.plot)


_ROWS = [("backbone + teacher attention at blocks {}", "perfect read, carried by the blocks above", "tab:blue"),
         ("backbone memory at blocks {}", "own read (backbone memory), carried by the blocks", "tab:cyan"),
         ("linear transport of perfect reads at {}", "perfect read, linear map to the output", "tab:orange"),
         ("linear transport of own reads at {}", "own read, linear map to the output", "tab:red")]


def _plot(report: dict, path: str) -> None:
    """Grouped bars: per split and block set, the four ways a read reaches the output."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(report["layer_sets"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, split in zip(axes, ("validation", "test")):
        ppl, chosen = report[split]["ppl"], report[split].get("chosen", {})
        base, w = ppl["backbone@1024"], 0.2
        for j, (row, label, color) in enumerate(_ROWS):
            vals = [chosen.get(row.format(t), ppl.get(row.format(t), float("nan"))) for t in sets]
            ax.bar([i + (j - 1.5) * w for i in range(len(sets))], [100 * (v / base - 1) for v in vals], w,
                   label=label, color=color)
        ax.axhline(100 * (ppl["teacher"] / base - 1), color="k", ls="--", lw=1, label="teacher")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(sets)), [f"blocks {t}" for t in sets], fontsize=8)
        ax.set_title({"validation": "validation books", "test": "Austen (test)"}[split])
    axes[0].set_ylabel("perplexity vs backbone@1024 (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)
    fig.set_layout_engine("tight", rect=(0, 0.1, 1, 1))  # room for the legend below
    fig.suptitle("how a memory read reaches the output: through the backbone's blocks, or a fitted linear map")
    save_figure(plt, fig, path)


if __name__ == "__main__":
    main()
