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
- backbone + teacher attention at blocks S: the read carried by the frozen blocks (session 43);
- residual carry at S: h_N + sum_b delta_b, no map (what the residual stream alone carries);
- linear transport at S: h_N + delta W_S, the ridge weight chosen per set on the validation
  documents (`--select validation`), scored on the validation and the test (Austen) documents.

CPU: a few minutes per ten documents.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longside.model import LongSideModel
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.training.data import tokenized_books

S = 1024


def _blocks(text: str) -> list[int]:
    return sorted({b for part in text.split(",") for b in (range(int(part.split("-")[0]), int(part.split("-")[1]) + 1)
                                                          if "-" in part else [int(part)])})


def _documents(bb, split: str, n: int, length: int, skip: int = 0) -> list[torch.Tensor]:
    """`n` documents of `length` tokens spread over the split's books (after the first `skip`)."""
    docs = [torch.from_numpy(b[s:s + length].astype(np.int64)) for b in tokenized_books(bb, split) if len(b) >= length
            for s in range(0, len(b) - length + 1, length)]
    return docs[skip:][:: max(1, len(docs[skip:]) // n)][:n]


def _reads(bb, doc: torch.Tensor, segments: int, blocks: list[int]):
    """Per scored segment i >= 1: (window h_N [S, d], teacher h_N [S, d], {b: delta_b [S, d]}, teacher o_proj
    outputs of the segment per block), all float32."""
    projs = [bb.parts.out_proj(block) for block in bb.parts.layers]
    out: dict[int, torch.Tensor] = {}

    def grab(b):
        return lambda _m, _a, o: out.__setitem__(b, o.detach()[0].float())
    hooks = [projs[b].register_forward_hook(grab(b)) for b in blocks]
    try:
        full = bb.encode(doc[None]).hidden_states[-1][0].float()
        t_out = dict(out)
        for i in range(1, segments):
            seg = slice(i * S, (i + 1) * S)
            h = bb.encode(doc[None, seg]).hidden_states[-1][0].float()
            yield h, full[seg], {b: t_out[b][seg] - out[b] for b in blocks}, {b: t_out[b][seg] for b in blocks}
    finally:
        for k in hooks:
            k.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit-docs", type=int, default=24, help="documents from the training books to fit the maps")
    ap.add_argument("--docs", type=int, default=4, help="documents scored per split (validation, test)")
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--layer-sets", nargs="*", default=["20", "29", "17,20,23,26,29", "15-29"])
    ap.add_argument("--ridge", nargs="*", type=float, default=[1e-3, 1e-2, 1e-1, 1.0],
                    help="ridge weights, relative to the mean diagonal of X'X; one chosen per set on validation")
    ap.add_argument("--json")
    args = ap.parse_args()
    check_output_file(args.json, "--json")
    run = RunRecord.start()
    torch.set_grad_enabled(False)
    bb = LongSideModel.from_pretrained().backbone  # the shipped checkpoint's backbone, as evaluation loads it
    sets = {t: _blocks(t) for t in args.layer_sets}
    union = sorted({b for bs in sets.values() for b in bs})
    L, d = S * args.segments, bb.spec.hidden_size
    score = lambda h, ids: float(F.cross_entropy(bb.lm_head(bb.final_norm(h[None]))[0, :-1].float(), ids[1:],
                                                  reduction="sum"))

    # 1. normal equations per set over the training documents
    xtx = {t: torch.zeros(len(bs) * d, len(bs) * d, dtype=torch.float64) for t, bs in sets.items()}
    xty = {t: torch.zeros(len(bs) * d, d, dtype=torch.float64) for t, bs in sets.items()}
    for doc in tqdm(_documents(bb, "train", args.fit_docs, L), desc="fit documents"):
        for h, full, delta, _ in _reads(bb, doc, args.segments, union):
            y = full - h
            for t, bs in sets.items():
                x = torch.cat([delta[b] for b in bs], dim=1)  # float32 products, float64 sums over segments
                xtx[t] += (x.T @ x).double()
                xty[t] += (x.T @ y).double()
    maps = {}
    for t in sets:
        scale = float(xtx[t].diagonal().mean())
        eye = torch.eye(xtx[t].shape[0], dtype=torch.float64)
        maps[t] = {r: torch.linalg.solve(xtx[t] + r * scale * eye, xty[t]).float() for r in args.ridge}
    del xtx, xty

    # 2. score the validation and test documents
    report: dict = {}
    for split in ("validation", "test"):
        rows: dict[str, list[float]] = {}
        n_tok = 0

        def add(row, nll):
            rows.setdefault(row, [0.0])[0] += nll
        for doc in tqdm(_documents(bb, split, args.docs, L), desc=f"{split} documents"):
            projs = [bb.parts.out_proj(block) for block in bb.parts.layers]
            for i, (h, full, delta, t_out) in enumerate(_reads(bb, doc, args.segments, union), start=1):
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
                    add(f"residual carry at {t}", score(h + sum(delta[b] for b in bs), ids))
                    x = torch.cat([delta[b] for b in bs], dim=1)
                    for r, W in maps[t].items():
                        add(f"linear transport at {t} (ridge {r:g})", score(h + x @ W, ids))
        ppl = {r: math.exp(v[0] / n_tok) for r, v in rows.items()}
        report[split] = {"ppl": ppl, "tokens": n_tok}
    # the ridge weight per set: the best on validation, applied to both splits
    chosen = {t: min(args.ridge, key=lambda r: report["validation"]["ppl"][f"linear transport at {t} (ridge {r:g})"])
              for t in sets}
    for split in ("validation", "test"):
        ppl = report[split]["ppl"]
        base = ppl["backbone@1024"]
        print(f"--- {split} ({report[split]['tokens']} tokens)")
        for r, v in ppl.items():
            if "ridge" in r and not r.endswith(f"(ridge {chosen[r.split(' at ')[1].split(' (')[0]]:g})"):
                continue
            print(f"{r:60s} {v:8.3f}  {100 * (v / base - 1):+6.2f}%")
    if args.json:
        write_json({**report, "ridge_chosen": chosen, "fit_docs": args.fit_docs, "docs": args.docs,
                    "segments": args.segments, "layer_sets": sets, "run": run.finish()}, args.json)


if __name__ == "__main__":
    main()
