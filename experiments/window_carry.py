"""What a segment's first tokens lose: longside's window restarted empty at every segment,
against a window that carries the last tokens of the one before.

    python experiments/window_carry.py --carry 1 256 512 --json results/window_carry.json

longside reads text in segments of `window` tokens, and every local cache restarts empty
at a segment's start (inference/window.py): a segment's first tokens see almost nothing
but memory. Here each forward reads `carry` tokens of the text before its new tokens (not
scored, the window otherwise as usual: at most `window` tokens), so every scored token
sees at least `carry` tokens of local context; memory is written as the text advances
(each token once, with the keys of the forward that scored it). carry 1 is today's
segmented reading (the last token of the previous segment predicts the first of the next).
Rows per carry: the shipped checkpoint with memory off, and with memory (token cache on,
memory capacity `--memory-tokens`); and the bare backbone over the same forwards. One book
of the test split. Reading a text this way in the product (forward, LocalWindow,
memorize) is not built: this measures what it would give.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import importlib

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longside.eval.common import book_chapters, git_commit, load_book_data, load_model, with_capacity
from longside.paths import check_output_file, write_json

ppl_eval = importlib.import_module("longside.eval.ppl")

def carried_nll(model, ids: torch.Tensor, carry: int, use_memory: bool | None) -> torch.Tensor:
    """NLL `[N-1]` of tokens 1..N-1 of `ids [N]`, each forward reading up to the window with
    at least `carry` earlier tokens before its new ones. `use_memory` None: the bare backbone.
    With backbone memory, each block's bank gets the same tokens as the memory layer's (a
    forward's tokens already in memory are skipped as its sink tokens are)."""
    W = model.config.window
    stride = W - carry
    n = len(ids)
    nll = torch.empty(n - 1)
    written = 0
    if use_memory is not None:
        model.reset_memory()
    for t0 in tqdm(range(1, n, stride), leave=False):
        t1 = min(t0 + stride, n)
        b = max(0, t1 - W)
        x = ids[None, b:t1]
        with torch.no_grad():
            if use_memory is None:
                h = model.backbone.encode(x).last_hidden
                logits = model.backbone.lm_head(h)[0]
            else:
                out, h, tok_keys, hits = model.read_segment(x, use_memory)
                logits = model.output(h, hits)[0]
                s = written - b  # this forward's first token not yet in memory
                part = dataclasses.replace(out, memory_keys=out.memory_keys[:, s:],
                                           memory_values=out.memory_values[:, s:])
                bm = model.memory.blocks
                sinks = bm.sink_tokens if bm is not None else 0
                if bm is not None:
                    bm.sink_tokens = max(sinks, s)
                try:
                    model.write_segment(part, x[:, s:], None if tok_keys is None else tok_keys[:, s:])
                finally:
                    if bm is not None:
                        bm.sink_tokens = sinks
                written = t1
        nll[t0 - 1:t1 - 1] = F.cross_entropy(logits[t0 - 1 - b:t1 - 1 - b].float(), ids[t0:t1], reduction="none")
    return nll


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--book", type=int, default=0, help="index in the test split (0: Sense and Sensibility)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--memory-tokens", type=int, default=16384)
    p.add_argument("--carry", type=int, nargs="+", default=[1, 256, 512])
    p.add_argument("--rows", nargs="+", choices=("backbone", "memory off", "memory", "memory+bm"),
                   default=["backbone", "memory off", "memory"],
                   help="memory+bm: memory with backbone memory in blocks 15-29")
    p.add_argument("--native", action="store_true",
                   help="also the bare backbone at its native context, sliding by one window (eval ppl's row)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    check_output_file(args.json, "--json")  # before the long work
    model, info = load_model()
    model = with_capacity(model, args.memory_tokens)
    bm_model = None
    if "memory+bm" in args.rows:
        bm_model = with_capacity(model, args.memory_tokens)
        bm_model.use_backbone_memory(range(15, 30))
    W = model.config.window
    if any(not 1 <= c < W for c in args.carry):
        raise SystemExit(f"--carry must lie in [1, {W - 1}]")
    books, data_id = load_book_data(None, "test")
    book = books[args.book]
    ids = torch.tensor([t for ch in book_chapters(model.backbone.tokenizer, book) for t in ch][:args.tokens])
    pos = torch.arange(1, len(ids))
    rows = {}
    for carry in args.carry:
        for row in args.rows:
            started = time.time()
            nll = carried_nll(bm_model if row == "memory+bm" else model, ids, carry,
                              None if row == "backbone" else row != "memory off")
            name = f"{row}, carry {carry}"
            rows[name] = {"carry": carry, "row": row, "ppl": math.exp(nll.mean()),
                          "ppl_after_1024": math.exp(nll[pos >= 1024].mean()), "tokens": len(nll),
                          "seconds": round(time.time() - started, 1)}
            print(json.dumps({name: rows[name]}), file=sys.stderr)
    if args.native:
        ctx = model.backbone.spec.max_positions
        started = time.time()

        class _Bar:
            def update(self, n):
                pass
        nll = ppl_eval._strided_nll(model.backbone, ids, ctx, W, _Bar())
        rows[f"backbone@{ctx}"] = {"ppl": math.exp(nll.mean()), "ppl_after_1024": math.exp(nll[pos >= 1024].mean()),
                                   "tokens": len(nll), "seconds": round(time.time() - started, 1)}
        print(json.dumps({f"backbone@{ctx}": rows[f"backbone@{ctx}"]}), file=sys.stderr)
    report = {"experiment": "window_carry", "model": info, "git_commit": git_commit(),
              "data": {"books": data_id, "title": book["title"]}, "config": vars(args), "results": rows}
    if args.json:
        write_json(report, args.json)
    else:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
