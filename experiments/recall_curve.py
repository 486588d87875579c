"""How a training run's loss moved on the tokens that need memory, against the rest.

A run's history (`history.json` in its checkpoint directory) holds one next-token loss per
step. A step scores either a book segment (~1023 tokens) or the answer of a synthetic
pass-key document (" 12345.", the fact stated in an earlier segment, so it can only come
from memory). This replays the run's document stream (deterministic from its config: the
documents are a function of (seed, number)), labels each step by kind, and reports each
kind's mean loss over windows of `--window` steps, as JSON and a plot.

    python experiments/recall_curve.py results/recall_training/* --window 100 \\
        --json results/recall_curve.json --plot results/recall_curve.png
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


def curve(run: Path, window: int, backbone_cache: dict) -> dict:
    """One run's windows: mean loss of each kind of step."""
    cfg = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
    history = json.loads((run / "history.json").read_text())
    if cfg.backbone not in backbone_cache:
        backbone_cache[cfg.backbone] = load_backbone(cfg.backbone, quantize=cfg.quantize)
    backbone = backbone_cache[cfg.backbone]
    kinds = step_kinds(cfg, backbone.tokenizer, tokenized_books(backbone, "train"), len(history))
    windows = []
    for start in range(0, len(history), window):
        rows = list(zip(kinds[start:start + window], history[start:start + window]))
        windows.append({"steps": [start + 1, start + len(rows)],
                        **{f"{k}_loss": float(np.mean(v)) if (v := [h["lm"] for kk, h in rows if kk == k]) else None
                           for k in ("answer", "book")},
                        "answers": sum(k == "answer" for k, _ in rows)})
    side = cfg.side
    return {"run": str(run), "steps": len(history), "answers": kinds.count("answer"), "segment": cfg.segment,
            "token_cache_in_loss": cfg.token_cache_in_loss, "memory_sink_tokens": side.memory_sink_tokens,
            "memory_distance": side.memory_distance, "windows": windows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="directories written by `longside train` (train_config.json, history.json)")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    record = RunRecord.start(["python", "experiments/recall_curve.py", *args.runs, "--window", str(args.window)])
    cache: dict = {}
    runs = [curve(Path(r), args.window, cache) for r in args.runs]
    report = {"window": args.window, "runs": runs, "provenance": record.finish()}
    print(json.dumps({k: v for k, v in report.items() if k != "provenance"}, indent=1))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for run in runs:
            mid = [(w["steps"][0] + w["steps"][1]) / 2 for w in run["windows"]]
            line, = ax.plot(mid, [w["answer_loss"] for w in run["windows"]], "o-", label=f"{Path(run['run']).name}: answers")
            ax.plot(mid, [w["book_loss"] for w in run["windows"]], "--", color=line.get_color(), alpha=0.5,
                    label=f"{Path(run['run']).name}: book text")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"next-token loss (mean over {args.window} steps)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save_figure(plt, fig, args.plot)


if __name__ == "__main__":
    main()
