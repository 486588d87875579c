"""How much does the token memory's projected shortlist miss? (real hidden states)

Stores the block-25 hidden states of the first `--segments` 1024-token segments of a
validation book in two token memories, one searching every key in bfloat16 (exact
rescoring of 2k candidates) and one shortlisting 4k candidates by a 128-wide principal
projection (then the same exact rescoring); queries are the next segment's states. Prints
JSON: recall of the first memory's 64 neighbours by the second, the largest difference
of the best similarity, and the time of a one-query search in each (one thread).

    python experiments/token_shortlist_recall.py [--segments 16] [--json PATH]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from longside.memory_bank import TokenMemory

from longside.backbone import load_backbone
from longside.training.data import tokenized_books


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segments", type=int, default=16)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    bb = load_backbone("smollm2-135m")
    layer = round(0.83 * bb.spec.num_layers)
    book = torch.from_numpy(tokenized_books(bb, "validation")[0].astype("int64"))
    W = 1024
    full = TokenMemory(bb.spec.hidden_size, 65536, shortlist_dim=0)
    short = TokenMemory(bb.spec.hidden_size, 65536, shortlist_dim=128)
    with torch.no_grad():
        for i in range(args.segments + 1):
            ids = book[i * W:(i + 1) * W]
            h = bb.encode(ids[None], memory_layer=15).hidden_states[layer][0]
            if i == args.segments:
                queries = h
            else:
                full.add(h, ids)
                short.add(h, ids)
    s_full, s_short = full.search(queries, args.k)[0], short.search(queries, args.k)[0]
    # the true k-th similarity, by float32 products against the stored keys: a returned
    # neighbour at least that similar is one of the true k nearest
    exact = torch.nn.functional.normalize(queries.float(), dim=-1) @ full._keys[:len(full)].float().T
    kth = exact.topk(args.k, dim=-1).values[:, -1:]

    def recall(sims: torch.Tensor) -> float:
        return float((sims >= kth - 1e-5).float().mean())

    def timed(mem: TokenMemory) -> float:
        q = queries[:1]
        for _ in range(3):
            mem.search(q, args.k)
        t = time.perf_counter()
        for _ in range(50):
            mem.search(q, args.k)
        return (time.perf_counter() - t) / 50 * 1e3
    out = {"tokens_in_memory": len(full), "queries": int(queries.shape[0]), "k": args.k,
           "recall_bf16_shortlist": recall(s_full), "recall_projected_shortlist": recall(s_short),
           "max_best_similarity_gap": float((s_full[:, 0] - s_short[:, 0]).abs().max()),
           "search_ms_bf16_shortlist": timed(full), "search_ms_projected_shortlist": timed(short)}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
