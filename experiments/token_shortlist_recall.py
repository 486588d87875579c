"""How much does the token memory's projected shortlist miss? (real hidden states)

For each of the first `--books` validation books: stores the block-25 hidden states of its
first `--segments` 1024-token segments in two token memories, one searching every key in
bfloat16 (exact rescoring of 2k candidates) and one shortlisting 4k candidates by a
128-wide principal projection kept in int8 with a scale per key, as shipped since session
29 (then the same exact rescoring); queries are the next segment's states. Recall is the
share of the true 64 nearest (float32 products against the stored keys) that a search
returns. Reported per book and on average:

- `recall_bf16_shortlist`: the first memory;
- `recall_projected_shortlist`: the second, all queries at once (torch's path, segment reads);
- `recall_projected_shortlist_one_query`: the same, one query per call (the C call of a
  decode step, query rounded to int16);
- `recall_bf16_projection`: the same basis with the projections rounded to bfloat16 instead
  of int8, shortlisted by torch (what the memory kept before session 29), for comparison;
- `search_ms_*`: one query, one thread, median of 5 x 50 calls.

    python experiments/token_shortlist_recall.py [--books 2] [--segments 16] [--json PATH]
"""

import argparse
import json
import statistics
import sys
import time

import torch
from longside.memory_bank import TokenMemory

from longside.backbone import load_backbone
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.training.data import tokenized_books


def _recall(sims: torch.Tensor, kth: torch.Tensor) -> float:
    """Share of returned similarities at least the true k-th: each such is a true neighbour."""
    return float((sims >= kth - 1e-5).float().mean())


def _timed(mem: TokenMemory, q: torch.Tensor, k: int) -> float:
    for _ in range(3):
        mem.search(q, k)
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(50):
            mem.search(q, k)
        runs.append((time.perf_counter() - t) / 50 * 1e3)
    return statistics.median(runs)


def _one_book(bb, book: torch.Tensor, segments: int, k: int) -> dict:
    layer = round(0.83 * bb.spec.num_layers)
    W = 1024
    full = TokenMemory(bb.spec.hidden_size, 65536, shortlist_dim=0)
    short = TokenMemory(bb.spec.hidden_size, 65536, shortlist_dim=128)
    with torch.no_grad():
        for i in range(segments + 1):
            ids = book[i * W:(i + 1) * W]
            h = bb.encode(ids[None], memory_layer=15).hidden_states[layer][0]
            if i == segments:
                queries = h
            else:
                full.add(h, ids)
                short.add(h, ids)
    n = len(full)
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    exact = q @ full._keys[:n].float().T
    kth = exact.topk(k, dim=-1).values[:, -1:]
    s_full, s_short = full.search(queries, k)[0], short.search(queries, k)[0]
    s_one = torch.cat([short.search(queries[i:i + 1], k)[0] for i in range(queries.shape[0])])
    # the projection rounded to bfloat16, shortlisted by torch's product: the memory before int8
    proj = (short._keys[:n].float() @ short._basis).to(torch.bfloat16)
    approx = (q @ short._basis).to(torch.bfloat16) @ proj.T
    cand = approx.topk(min(4 * k, n), dim=-1).indices
    s_bf16 = exact.gather(1, cand).topk(k, dim=-1).values
    return {"tokens_in_memory": n, "queries": int(queries.shape[0]),
            "recall_bf16_shortlist": _recall(s_full, kth), "recall_projected_shortlist": _recall(s_short, kth),
            "recall_projected_shortlist_one_query": _recall(s_one, kth),
            "recall_bf16_projection": _recall(s_bf16, kth),
            "max_best_similarity_gap": float((s_full[:, 0] - s_short[:, 0]).abs().max()),
            "search_ms_bf16_shortlist": _timed(full, queries[:1], k),
            "search_ms_projected_shortlist": _timed(short, queries[:1], k)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--books", type=int, default=2)
    p.add_argument("--segments", type=int, default=16)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    run = RunRecord.start(["python", "experiments/token_shortlist_recall.py", *sys.argv[1:]])
    torch.set_num_threads(1)
    bb = load_backbone("smollm2-135m")
    books = tokenized_books(bb, "validation")[:args.books]
    rows = []
    for b, book in enumerate(books):
        rows.append({"book": b, **_one_book(bb, torch.from_numpy(book.astype("int64")), args.segments, args.k)})
        print(json.dumps(rows[-1]), flush=True)
    keys = [key for key in rows[0] if key.startswith(("recall", "search_ms"))]
    out = {"experiment": "token shortlist recall", "k": args.k, "segments": args.segments, "books": rows,
           "mean": {key: statistics.fmean(r[key] for r in rows) for key in keys}, "provenance": run.finish()}
    print(json.dumps(out["mean"], indent=2))
    if args.json:
        write_json(out, args.json)


if __name__ == "__main__":
    main()
