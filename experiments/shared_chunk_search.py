"""Could one search serve all 15 blocks of backbone memory? The recall of a shared shortlist.

    python experiments/shared_chunk_search.py [--memory-tokens 16384] [--json PATH]

Backbone memory searches each reading block's bank for every query (15 scans of all chunk keys
a token: most of what it costs, `experiments/backbone_memory_step.py`). The banks hold the same
tokens in the same chunk slots (they are written together), so a shortlist of slots found once
could be rescored by each block over its own chunk keys, reading a few hundred chunks instead of
all. This measures whether the shortlist would hold what each block's own exact search picks:
the shipped checkpoint with backbone memory 15-29, `--memory-tokens` of held-out Austen
memorized, then the next 1,024 tokens read as one segment; every block's memory queries (its
pre-rotary queries rotated at the memory distance, recorded as the block reads) are searched
exactly in its own bank (top 16 chunks per query head, as the model reads), and against each
shortlist: the union over the 9 query heads of the first block's top `m` chunks (m = 8, 16, 32,
64), per token. Reported per block and shortlist: the share of the block's exact top-16 chunks
in the shortlist (recall), and the shortlist's mean size. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

from longside.bench.generate import _texts
from longside.loading import load_model
from longside.nn.backbone_memory import BackboneMemory
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord

K = 16  # chunks per query head the model reads (backbone_memory_k_chunks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory-tokens", type=int, default=16384)
    p.add_argument("--shortlists", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    run = RunRecord.start()
    model, info = load_model()
    model.use_backbone_memory(range(15, 30))
    ids, source = _texts(args.memory_tokens + 1024, model.backbone.tokenizer)
    model.memory.write_ids(ids[:args.memory_tokens])
    bm = model.memory.blocks
    first = bm.layers[0]
    banks = {L: bm.banks[L][0] for L in bm.layers}
    if len({(b._used, b._nfree) for b in banks.values()}) != 1:
        raise SystemExit("the block banks' slots are not aligned; the shared shortlist does not apply")
    queries: dict[int, torch.Tensor] = {}
    read = BackboneMemory._read

    def record(self, L, rows, q, window_kr, a):
        B, T = q.shape[:2]
        queries[L] = self.backbone.rotate(q, torch.full((B, T), self.distance), L)[0]  # [T, H, D]
        return read(self, L, rows, q, window_kr, a)

    BackboneMemory._read = record
    try:
        model(torch.tensor([ids[args.memory_tokens:args.memory_tokens + 1024]]), write_memory=False,
              return_logits=False)
    finally:
        BackboneMemory._read = read
    spec = model.backbone.spec
    G, g = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads

    def exact(L: int, k: int) -> torch.Tensor:
        """[T, H, k] slots: block L's own top-k per query head (what `MemoryBank.search` picks)."""
        q = queries[L]
        T, H, D = q.shape
        slots = banks[L]._flat_topk(q.view(T, G, g, D).permute(1, 0, 2, 3).reshape(G, T * g, D), k)
        return slots.view(G, T, g, k).permute(1, 0, 2, 3).reshape(T, H, k)

    want = {L: exact(L, K) for L in bm.layers}
    C = banks[first].capacity_chunks
    rows = {}
    for m in args.shortlists:
        top = exact(first, m)  # [T, H, m]
        T = top.shape[0]
        short = torch.zeros(T, C + 1, dtype=torch.bool)
        short.scatter_(1, top.reshape(T, -1), True)
        short[:, C] = False  # the empty sentinel
        size = short.sum(1).float().mean().item()
        per_block = {}
        for L in bm.layers:
            w = want[L]
            real = w != C
            hit = torch.gather(short, 1, w.reshape(T, -1)).view_as(w) & real
            per_block[str(L)] = round(hit.sum().item() / max(1, real.sum().item()), 4)
        rows[str(m)] = {"shortlist_chunks_mean": round(size, 1), "chunks_in_memory": banks[first].num_chunks,
                        "recall_per_block": per_block,
                        "recall_mean_blocks_16_29": round(sum(v for L, v in per_block.items() if int(L) != first)
                                                          / (len(per_block) - 1), 4)}
    report = {"experiment": "shared_chunk_search", "memory_tokens": args.memory_tokens, "text": source,
              "query_tokens": 1024, "k_chunks": K, "first_block": first, "checkpoint": info["note"],
              "shortlists": rows, "provenance": run.finish()}
    print(json.dumps(report, indent=1))
    if args.json:
        write_json(report, args.json, indent=1)


if __name__ == "__main__":
    main()
