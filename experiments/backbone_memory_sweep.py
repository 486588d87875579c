"""Which backbone blocks should read memory, and how many chunks each: a perplexity sweep.

Each variant is the shipped checkpoint with `use_backbone_memory(layers, k_chunks)`; every
book of the held-out test split (first `--books`) is streamed in 1024-token segments from
an empty memory, and segments 2..N are scored (the first has nothing in memory). The
first row is backbone memory off (the shipped checkpoint as it is).

    python experiments/backbone_memory_sweep.py --books 2 --segments 8 --json results/backbone_memory_sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from longside.eval.common import book_chapters, git_commit, load_book_data, load_model
from tqdm.auto import tqdm

from longside.config import parse_blocks

VARIANTS = {  # name -> (blocks, chunks per query)
    "off": ("", 8),
    "blocks 15-29, k 8": ("15-29", 8),
    "blocks 15-29, k 16": ("15-29", 16),
    "blocks 10-29, k 16": ("10-29", 16),
    "blocks 20-29, k 16": ("20-29", 16),
    "blocks 5-29, k 16": ("5-29", 16),
    "blocks 15-29, k 32": ("15-29", 32),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--books", type=int, default=2)
    p.add_argument("--segments", type=int, default=8, help="segments per book (the first is not scored)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    model, info = load_model()
    W = model.config.window
    books, data_id = load_book_data(None, "test")
    streams = [[t for ch in book_chapters(model.backbone.tokenizer, b) for t in ch][:args.segments * W]
               for b in books[:args.books]]
    rows = {}
    for name in args.variants:
        blocks, k = VARIANTS[name]
        model.reset_memory()
        model.use_backbone_memory(parse_blocks(blocks), k_chunks=k)
        nll = n = 0.0
        started = time.time()
        for ids in tqdm(streams, desc=name, leave=False):
            model.reset_memory()
            for s in range(0, len(ids), W):
                seg = torch.tensor([ids[s:s + W]])
                with torch.no_grad():
                    out = model(seg, labels=seg if s else None, return_logits=False)
                if s:
                    nll += out.loss.item() * out.n_tokens
                    n += out.n_tokens
        rows[name] = {"blocks": blocks, "k_chunks": k, "ppl": math.exp(nll / n), "tokens": int(n),
                      "seconds": round(time.time() - started, 1)}
        print(json.dumps({name: rows[name]}), file=sys.stderr)
    base = rows.get("off", {}).get("ppl")
    for r in rows.values():
        r["vs_off"] = r["ppl"] / base - 1 if base else None
    report = {"evaluation": "backbone_memory_sweep", "model": info, "git_commit": git_commit(),
              "data": {"books": data_id, "titles": [b["title"] for b in books[:args.books]]},
              "config": vars(args), "results": rows}
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
