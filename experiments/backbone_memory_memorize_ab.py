"""Memorizing with backbone memory: the blocked `causal_lse` against the whole-matrix one
it replaced (session 33), in one process, pairs alternating.

    python experiments/backbone_memory_memorize_ab.py --tokens 8192 --pairs 2 --json results/backbone_memory_memorize_ab.json

Each run memorizes the first `--tokens` tokens of Sense and Sensibility into an empty memory
with backbone memory in blocks 15-29 (the shipped checkpoint otherwise), two threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import longside.nn.backbone_memory as backbone_memory
from longside.eval.common import book_chapters, git_commit, load_book_data, load_model
from longside.paths import check_output_file, write_json

sys.path.insert(0, str(Path(__file__).parent))
from causal_lse_ab import whole_matrix  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    check_output_file(args.json, "--json")  # before the long work
    torch.set_num_threads(2)
    model, info = load_model()
    model.use_backbone_memory(range(15, 30))
    books, _ = load_book_data(None, "test")
    ids = [t for ch in book_chapters(model.backbone.tokenizer, books[0]) for t in ch][:args.tokens]
    blocked = backbone_memory.causal_lse
    seconds = {"blocked": [], "whole": []}
    banks = {}
    for _ in range(args.pairs):
        for label, fn in (("blocked", blocked), ("whole", whole_matrix)):
            backbone_memory.causal_lse = fn
            try:
                model.reset_memory()
                t = time.perf_counter()
                model.memory.write_ids(ids)
                seconds[label].append(time.perf_counter() - t)
            finally:
                backbone_memory.causal_lse = blocked
            bank = model.memory.blocks.banks[29][0]
            banks[label] = bank._keys[:, :bank.num_chunks].float().clone()
            print(label, round(seconds[label][-1], 2), file=sys.stderr)
    same = torch.allclose(banks["blocked"], banks["whole"], atol=2e-2, rtol=0)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    report = {"experiment": "backbone_memory_memorize_ab", "git_commit": git_commit(), "tokens": len(ids),
              "threads": 2, "seconds": seconds, "median_s": med, "time_ratio": med["blocked"] / med["whole"],
              "tokens_per_s": {k: len(ids) / v for k, v in med.items()}, "block29_keys_close": same}
    if args.json:
        write_json(report, args.json)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
