"""How a training run's loss moved on the tokens that need memory, against the rest.

A run's history (`history.json` in its checkpoint directory) holds one next-token loss per
step. A step scores either a book segment (~1023 tokens) or the answer of a synthetic
pass-key document (" 12345.", the fact stated in an earlier segment, so it can only come
from memory). This replays the run's document stream (deterministic from its config: the
documents are a function of (seed, number)), labels each step by kind, and reports each
kind's mean loss over windows of `--window` steps, as JSON and a plot.

    python experiments/recall_curve.py /work/runs/s41/recall --json results/recall_curve.json \\
        --plot results/recall_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from longside.backbone import load_backbone
from longside.eval.common import pyplot, save_figure
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.training.config import TrainConfig
from longside.training.data import DocumentStream, RowCursor, tokenized_books


def step_kinds(cfg: TrainConfig, tokenizer, books, n_steps: int) -> list[str]:
    """'answer' or 'book' for each of a batch-size-1 run's first `n_steps` steps, as the
    training loop takes them (a segment with nothing scored is written, not a step)."""
    if cfg.batch_size != 1:
        raise SystemExit("the replay follows batch-size-1 runs only")
    cursor = RowCursor(DocumentStream(books, cfg, tokenizer), 1)
    kinds = []
    while len(kinds) < n_steps:
        _, labels, _ = cursor.next_batch()
        scored = int((labels != -100).sum())
        if scored:
            kinds.append("answer" if scored < 64 else "book")  # an answer is a handful of tokens
    return kinds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a checkpoint directory written by `longside train` (train_config.json, history.json)")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    record = RunRecord.start(["python", "experiments/recall_curve.py", args.run, "--window", str(args.window)])
    run = Path(args.run)
    cfg = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
    history = json.loads((run / "history.json").read_text())
    backbone = load_backbone(cfg.backbone, quantize=cfg.quantize)
    kinds = step_kinds(cfg, backbone.tokenizer, tokenized_books(backbone, "train"), len(history))
    windows = []
    for start in range(0, len(history), args.window):
        rows = list(zip(kinds[start:start + args.window], history[start:start + args.window]))
        windows.append({"steps": [start + 1, start + len(rows)],
                        **{f"{k}_loss": float(np.mean(v)) if (v := [h["lm"] for kk, h in rows if kk == k]) else None
                           for k in ("answer", "book")},
                        "answers": sum(k == "answer" for k, _ in rows)})
    report = {"run": str(run), "steps": len(history), "answers": kinds.count("answer"), "window": args.window,
              "windows": windows, "provenance": record.finish()}
    print(json.dumps({k: v for k, v in report.items() if k != "provenance"}, indent=1))
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        mid = [(w["steps"][0] + w["steps"][1]) / 2 for w in windows]
        for k, style in (("answer", "o-"), ("book", "s--")):
            ax.plot(mid, [w[f"{k}_loss"] for w in windows], style, label=f"{k} tokens")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"next-token loss (mean over {args.window} steps)")
        ax.legend()
        ax.grid(alpha=0.3)
        save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
