"""`longside fit-query-maps`: train backbone memory's query maps against the long-context teacher.

Each block of `--blocks` gets a map that changes the query it searches and scores memory
with (longside/training/query_maps.py), fitted toward the frozen backbone with the whole
document in its window (the teacher), on documents of the training books (never the
validation or test books). `--loss output` (the default): the maps together, toward the
teacher's next-token distribution, the gradient passing through the frozen blocks above each
map (their weights get none); `--loss block`: each block's read toward the teacher's attention
output at that block, no gradient through the backbone. The checkpoint is saved with the maps
and with backbone memory on at those blocks:

    longside fit-query-maps --out runs/mapped --docs 24 --json results/fit_query_maps.json

Windows are read as the checkpoint reads a text (its window carry). Measured
(docs/results.md#query-maps): with the shipped carried windows, maps fitted by the output loss
lower the backbone's perplexity beyond untrained backbone memory (session 47); fitted block by
block they helped only with cold windows on short memories (session 45). Score a fit before
you use it (`longside eval ppl --model DIR --query-maps on|off`).
"""

from __future__ import annotations

import argparse
import json
import time

from longside.config import parse_blocks
from longside.errors import LongsideError
from longside.loading import load_model
from longside.paths import check_output_dir, check_output_file, write_json
from longside.training.data import book_documents
from longside.training.query_maps import QueryMapConfig, train_query_maps


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="longside fit-query-maps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the shipped one)")
    p.add_argument("--out", required=True, help="where to save the checkpoint with its maps")
    p.add_argument("--blocks", default="15-29", help="blocks that read memory, e.g. 15-29 (default)")
    p.add_argument("--docs", type=int, default=48, help="training documents of 4 x the window (default 48)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the documents (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--segments", type=int, default=4,
                   help="document length in windows; the teacher reads each whole (default 4)")
    p.add_argument("--carry", type=int, help="tokens each window carries from the one before (default: the "
                                             "checkpoint's window carry; 0: cold windows, where session 45 measured a gain)")
    p.add_argument("--loss", choices=("output", "block"), default="output",
                   help="output: the teacher's next-token distribution, through the blocks above (default); "
                        "block: each block's attention output")
    p.add_argument("--json", help="write the fit report here")
    args = p.parse_args(argv)
    check_output_dir(args.out, "--out")
    check_output_file(args.json, "--json")
    if args.docs < 1 or args.epochs < 1 or args.segments < 2 or not args.lr > 0:
        raise LongsideError(f"--docs and --epochs must be >= 1, --segments >= 2 and --lr > 0, got {args.docs}, "
                            f"{args.epochs}, {args.segments}, {args.lr}")
    started = time.time()
    model, info = load_model(args.model)
    blocks = parse_blocks(args.blocks)
    carry = model.config.carry_for(model.config.window) if args.carry is None else args.carry
    config = QueryMapConfig(blocks=blocks, segment=model.config.window, segments=args.segments, lr=args.lr,
                            epochs=args.epochs, carry=carry, loss=args.loss)
    model.use_backbone_memory(blocks)  # refuses blocks the backbone lacks before any work
    docs = book_documents(model.backbone, "train", args.docs, config.segment * config.segments)
    maps, history = train_query_maps(model.backbone, model.config, docs, config)
    model.use_query_maps(maps)
    model.save_pretrained(args.out)
    first, last = history[0], history[-1]
    # output loss: the KL from the teacher per scored token; block loss: the blocks' mean share left unexplained
    summary = (lambda h: h["kl"]) if args.loss == "output" else (lambda h: sum(h.values()) / len(h))
    result = {"model": info["note"], "out": str(args.out), "blocks": blocks, "docs": len(docs), "carry": config.carry,
              "tokens": len(docs) * config.segment * config.segments, "epochs": args.epochs, "lr": args.lr,
              "loss": args.loss, "loss_first_doc": summary(first), "loss_last_doc": summary(last),
              "history": [{str(b): v for b, v in h.items()} for h in history],
              "wall_s": round(time.time() - started, 1)}
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    if args.json:
        write_json(result, args.json)
    return 0
