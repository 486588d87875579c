"""Backbone memory with trained query maps against the same memory untrained.

    python experiments/query_maps.py [--train-docs 48] [--docs 4] [--blocks 15-29] [--json PATH] [--plot PNG]

Fits one query map per block (longside/training/query_maps.py: each block's read trained
toward the long-context teacher's attention output there, no gradient through the backbone;
with `--loss output`, toward the teacher's next-token distribution, through the blocks above)
on documents of 4 x 1024 tokens from the training books, then scores the frozen backbone
alone (no side network, no token cache) over `--docs` documents of the validation books and of
Austen (test), in windows of 1024 tokens that carry `--carry` tokens from the one before (as
`eval ppl` reads), every token past the first window: memory off, backbone memory untrained,
backbone memory with the maps. Writes the maps with `--save` (a safetensors file).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from longside.config import parse_blocks
from longside.eval.common import save_figure
from longside.model import LongSideModel
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.training.data import book_documents
from longside.training.query_maps import QueryMapConfig, block_memory_nll, train_query_maps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint whose backbone and memory settings to use (default: shipped)")
    ap.add_argument("--train-docs", type=int, default=48)
    ap.add_argument("--docs", type=int, default=4, help="scored documents per split")
    ap.add_argument("--blocks", default="15-29")
    ap.add_argument("--segments", type=int, default=4, help="document length in windows (the teacher reads it whole: "
                                                            "at most the backbone's context)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--carry", type=int, default=None,
                    help="tokens each window after the first carries from the one before, in training and scoring "
                         "(default: the checkpoint's window_carry, 256 for the shipped one; 0: cold windows)")
    ap.add_argument("--loss", choices=("block", "output"), default="block",
                    help="block: each block's read against the teacher's attention output there (default); "
                         "output: KL from the teacher's next-token distribution plus next-token loss")
    ap.add_argument("--save", help="write the trained maps here (safetensors)")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="PNG: each block's training loss, and the scored rows")
    ap.add_argument("--replot", metavar="JSON", help="only draw --plot from a report this script wrote")
    args = ap.parse_args()
    for path, flag in ((args.json, "--json"), (args.plot, "--plot"), (args.save, "--save")):
        check_output_file(path, flag)
    if args.replot:
        if not args.plot:
            ap.error("--replot needs --plot")
        _plot(json.loads(Path(args.replot).read_text()), args.plot)
        return
    run = RunRecord.start()
    torch.set_grad_enabled(False)
    model = LongSideModel.from_pretrained(args.model)
    bb, blocks = model.backbone, parse_blocks(args.blocks)
    carry = model.config.carry_for(model.config.window) if args.carry is None else args.carry
    cfg = QueryMapConfig(blocks=blocks, segment=model.config.window, segments=args.segments, carry=carry, lr=args.lr, epochs=args.epochs,
                         loss=args.loss)
    train = book_documents(bb, "train", args.train_docs, cfg.segment * cfg.segments)
    maps, history = train_query_maps(bb, model.config, train, cfg)
    if args.save:
        save_file({f"block.{b}": m.contiguous() for b, m in maps.items()}, args.save,
                  metadata={"format": "longside-query-maps-v1"})
    report = {"blocks": blocks, "train_docs": len(train), "train_tokens": len(train) * cfg.segment * cfg.segments,
              "config": vars(cfg), "history": [{str(b): v for b, v in h.items()} for h in history], "splits": {}}
    for split in ("validation", "test"):
        docs = book_documents(bb, split, args.docs, cfg.segment * cfg.segments)
        untrained = block_memory_nll(bb, model.config, docs, blocks, None, cfg.segment, carry)
        trained = block_memory_nll(bb, model.config, docs, blocks, maps, cfg.segment, carry)
        assert untrained["off"] == trained["off"]
        ppl = {row: math.exp(v[0] / v[1]) for row, v in (("backbone@1024", untrained["off"]),
                                                          ("backbone memory, untrained", untrained["memory"]),
                                                          ("backbone memory, trained maps", trained["memory"]))}
        report["splits"][split] = {"ppl": ppl, "tokens": untrained["off"][1], "docs": len(docs)}
        base = ppl["backbone@1024"]
        for row, p in ppl.items():
            print(f"{split:10s} {row:32s} {p:8.3f} {100 * (p / base - 1):+6.2f}%")
    report["run"] = run.finish()
    if args.json:
        write_json(report, args.json)
    if args.plot:
        _plot(report, args.plot)


def _plot(report: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    hist = report["history"]
    output = report["config"].get("loss") == "output"
    curves = ["kl"] if output else list(map(str, report["blocks"]))  # each document's own difficulty sets its ce
    colours = plt.cm.viridis(np.linspace(0, 0.95, len(curves)))
    for b, c in zip(curves, colours):
        ys = [h[b] for h in hist if b in h]
        k = max(1, len(ys) // 8)
        left.plot(np.convolve(ys, np.ones(k) / k, mode="valid"), label="KL" if output else f"block {b}", lw=1, color=c)
    left.set(xlabel="training document", title="the loss (running mean)" if output else "each block's loss (running mean)",
             ylabel="KL from the teacher, nats per scored token" if output else "unexplained share of the teacher's change")
    left.legend(fontsize=6, ncol=3)
    names = {"validation": "validation", "test": "Austen"}
    rows = ["backbone memory, untrained", "backbone memory, trained maps"]
    x = np.arange(len(report["splits"]))
    for j, row in enumerate(rows):
        vals = [100 * (s["ppl"][row] / s["ppl"]["backbone@1024"] - 1) for s in report["splits"].values()]
        right.bar(x + 0.4 * j, vals, 0.4, label=row)
    right.set_xticks(x + 0.2, [names[s] for s in report["splits"]])
    right.set(ylabel="perplexity vs backbone@1024 (%)", title=f"blocks {report['blocks'][0]}-{report['blocks'][-1]}")
    right.set_ylim(1.35 * min(min(100 * (s["ppl"][r] / s["ppl"]["backbone@1024"] - 1) for r in rows)
                              for s in report["splits"].values()), 0)
    right.legend(loc="lower right", fontsize=8)
    save_figure(plt, fig, path)


if __name__ == "__main__":
    main()
