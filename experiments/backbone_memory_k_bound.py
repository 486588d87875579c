"""How much does backbone memory lose by retrieving? Perplexity as the chunks each query
reads grow from the default 16 to every chunk stored (exact attention over all of memory,
keys at the one rotary distance backbone memory uses).

    python experiments/backbone_memory_k_bound.py --segments 8 --k 16 64 256 all --json results/backbone_memory_k_bound.json

Shipped checkpoint, token cache off, backbone memory in blocks 15-29, one book of the test
split streamed in 1024-token segments from an empty memory, segments 2..N scored. "all"
attends to every stored token instead (exact attention over all of memory, no search), its
keys scored at the one distance as backbone memory does; "true" does the same with every
memory key at its true position in the book (the query at its own): what is left between
"all" and "true" is the price of scoring memory at one distance, what is left between "true"
and the teacher (the whole text in the window, experiments/oracle_read.py) the price of
memory keys computed by blocks 0-14 that saw only their own segment. "true" needs the book's
positions inside the backbone's (8 segments for SmolLM2's 8,192).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time

import torch
from tqdm.auto import tqdm

from longside.nn.attention import causal_lse
from longside.nn.backbone_memory import BackboneMemory
from longside.config import parse_blocks
from longside.eval.common import book_chapters, git_commit, load_book_data, load_model
from longside.paths import check_output_file, write_json


@contextlib.contextmanager
def whole_memory_reads(true_positions: bool, where: dict, k_chunks: int | None = None, limit: int = 1 << 30):
    """While inside, backbone memory attends to every token it stored (one row), keys scored
    at its distance or (`true_positions`) at their positions in the book; `where["start"]`: the
    book position of the segment being read. With `k_chunks`, each query and head attends only
    to the top `k_chunks` chunks (chunk-mean keys scored at the distance, as the bank does), at
their true positions but never more than `limit` tokens before the query."""
    write, read = BackboneMemory.write, BackboneMemory._read
    stored: dict[int, list] = {}

    def keep(self, seg):
        for L in seg.layers():
            k, v, _ = seg.window(L)
            n = k.shape[1]
            pos = torch.arange(where["start"], where["start"] + n)[self.sink_tokens:]
            stored.setdefault(L, []).append((k[0, self.sink_tokens:].clone(), v[0, self.sink_tokens:].clone(), pos))
        write(self, seg)

    def read_all(self, L, rows, q, window_kr, a):
        if L not in stored:
            return None
        bb = self.backbone
        B, T, H, D = q.shape
        K = torch.cat([x[0] for x in stored[L]])[None]  # [1, N, G, D]
        V = torch.cat([x[1] for x in stored[L]])[None]
        pos = torch.cat([x[2] for x in stored[L]])[None]
        P = window_kr.shape[1] - T
        local = causal_lse(bb.rotate(q, torch.arange(P, P + T).expand(B, T), L), window_kr)
        if true_positions:
            qm = bb.rotate(q, torch.arange(where["start"] + P, where["start"] + P + T).expand(B, T), L)
            km = bb.rotate(K, pos, L)
        else:
            qm = bb.rotate(q, torch.full((B, T), self.distance), L)
            km = bb.rotate(K, torch.zeros_like(pos), L)
        G = K.shape[2]
        out = torch.empty_like(a)
        if k_chunks is not None:
            return top_chunks(self, L, q, a, local, K, V, pos, where["start"] + P, true_positions)
        for g in range(G):
            hs = slice(g * H // G, (g + 1) * H // G)
            s = torch.einsum("bthd,bnd->bhtn", qm[:, :, hs], km[:, :, g]) / math.sqrt(D)
            lse = torch.logsumexp(s, -1)  # [B, h, T]
            a_mem = torch.einsum("bhtn,bnd->bthd", torch.exp(s - lse[..., None]), V[:, :, g])
            w = torch.sigmoid(lse.transpose(1, 2)[..., None] - local[:, :, hs])
            out[:, :, hs] = a[:, :, hs] + w * (a_mem - a[:, :, hs])
        return out

    def top_chunks(self, L, q, a, local, K, V, pos, start, true_positions):
        bb, S = self.backbone, self.banks[L][0].chunk_size
        B, T, H, D = q.shape
        G = K.shape[2]
        N = K.shape[1] // S * S
        CK = K[0, :N].reshape(N // S, S, G, D).mean(1)  # [Nc, G, D]: chunks never straddle segments
        qd = bb.rotate(q, torch.full((B, T), self.distance), L)[0]  # [T, H, D]
        qt = bb.rotate(q, torch.arange(start, start + T)[None], L)[0] if true_positions else qd
        out = a.clone()
        for h in range(H):
            g = h // (H // G)
            idx = (qd[:, h] @ CK[:, g].T).topk(min(k_chunks, CK.shape[0]), -1).indices  # [T, k]
            tok = (idx[..., None] * S + torch.arange(S)).flatten(1)  # [T, k*S]
            keys = K[0, tok, g][:, :, None]  # [T, k*S, 1, D]
            if true_positions:  # no key further back than `limit` from its query
                at = torch.maximum(pos[0, tok], torch.arange(start, start + T)[:, None] - limit)
            else:
                at = torch.zeros_like(tok)
            keys = bb.rotate(keys, at, L)[:, :, 0]
            sc = torch.einsum("td,tnd->tn", qt[:, h], keys) / math.sqrt(D)
            lse = torch.logsumexp(sc, -1)
            a_mem = torch.einsum("tn,tnd->td", torch.exp(sc - lse[:, None]), V[0, tok, g])
            w = torch.sigmoid(lse[:, None] - local[0, :, h])
            out[0, :, h] = a[0, :, h] + w * (a_mem - a[0, :, h])
        return out

    BackboneMemory.write, BackboneMemory._read = keep, read_all
    try:
        yield
    finally:
        BackboneMemory.write, BackboneMemory._read = write, read


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--book", type=int, nargs="+", default=[0], help="indices in the split (test 0: Sense and Sensibility)")
    p.add_argument("--split", default="test", help="the prepared corpus's split (test, validation, unseen)")
    p.add_argument("--segments", type=int, default=8, help="segments of the book (the first is not scored)")
    p.add_argument("--blocks", default="15-29")
    p.add_argument("--k", nargs="+", default=["0", "16", "64", "all", "true", "16-own", "16-true"],
                   help="chunks per query; 0 = memory off; all / true: every stored token (see above); "
                        "K-own / K-true: the top K chunks found here, attended at the distance / at true positions")
    p.add_argument("--distance", type=int, nargs="+", default=[0],
                   help="backbone memory's one distance (0: the checkpoint's, one window); several: one row each")
    p.add_argument("--limit", type=int, default=1 << 30,
                   help="K-true: the farthest a memory key is placed from its query (default: no limit)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    check_output_file(args.json, "--json")  # before the long work
    model, info = load_model()
    W = model.config.window
    books, data_id = load_book_data(None, args.split)
    streams = [[t for ch in book_chapters(model.backbone.tokenizer, books[b]) for t in ch][:args.segments * W]
               for b in args.book]
    rows = {}
    for k, d in [(k, d) for k in args.k for d in args.distance]:
        kk = int(k) if k.isdigit() else None
        top = int(k.split("-")[0]) if "-" in k else None
        model.reset_memory()
        model.use_backbone_memory(parse_blocks(args.blocks if kk != 0 else ""), k_chunks=kk or 16)
        model.config = dataclasses.replace(model.config, backbone_memory_distance=d)
        model.init_memory(1)
        name = k if len(args.distance) == 1 else f"{k} d={d}"
        where = {"start": 0}
        nll = n = 0.0
        started = time.time()
        for ids in streams:
            model.reset_memory()
            # one book at a time: the whole-memory reads keep their own copy of memory
            with whole_memory_reads(k == "true" or k.endswith("-true"), where, top, args.limit) \
                    if kk is None else contextlib.nullcontext():
                for s in tqdm(range(0, len(ids), W), desc=name, leave=False):
                    where["start"] = s
                    seg = torch.tensor([ids[s:s + W]])
                    with torch.no_grad():
                        out = model(seg, labels=seg if s else None, return_logits=False, token_cache=False)
                    if s:
                        nll += out.loss.item() * out.n_tokens
                        n += out.n_tokens
        rows[name] = {"k_chunks": kk, "distance": d or W, "ppl": math.exp(nll / n), "tokens": int(n),
                      "seconds": round(time.time() - started, 1)}
        print(json.dumps({name: rows[name]}), file=sys.stderr)
    base = rows.get("0", {}).get("ppl")
    for r in rows.values():
        r["vs_off"] = r["ppl"] / base - 1 if base else None
    report = {"experiment": "backbone_memory_k_bound", "model": info, "git_commit": git_commit(),
              "data": {"books": data_id, "titles": [books[b]["title"] for b in args.book]},
              "config": vars(args), "results": rows}
    if args.json:
        write_json(report, args.json)
    else:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
