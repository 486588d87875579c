"""Which side network? Train variants for the same steps on the same data, side by side.

Each variant is the shipped preset (`longside train --preset smollm2-135m`) with one
choice changed: the width reduction r (side width 576/r) or how memory attention mixes
memory with the local segment (`joint`: one softmax over both; `gated`: two softmaxes
and a learned per-head gate). All variants see the same documents in the same order
(same seed) from the same starting point (structured pruning of the backbone is
deterministic), with the token cache off, so what differs is the side network alone.
The backbone's features are encoded once and replayed for the later variants
(`--feature-cache`), which is what makes several variants affordable on a CPU.

A first row, the untrained side network (which gives exactly the backbone's logits), is
the baseline every variant is judged against. Measured per variant: training loss (mean
of the last quarter of steps), validation perplexity of the held-out validation books
with memory and without (segments 2-4 of each book, the training loop's own `validate`),
the answer perplexity of fixed synthetic recall documents (a number stated once in
validation-book filler, asked 1-3 segments later) with the earlier segments in memory
and without, trainable parameters, and seconds per step (the training run's wall time,
its final validation included, over its steps). JSON, and a PNG of the loss curves and
of each variant's difference from the first trained one (`--replot` redraws it).

    python experiments/side_ablation.py --steps 150 --json results/side_ablation.json \\
        --plot results/side_ablation.png --feature-cache /tmp/longside-features
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from longside.eval.common import git_commit, pyplot, save_figure

from longside.backbone import load_backbone
from longside.model import LongSideModel
from longside.training.config import preset
from longside.training.data import recall_document, tokenized_books
from longside.training.train import attach_feature_cache, train, validate

UNTRAINED = "untrained (= backbone)"  # no steps: the side network adds nothing yet
VARIANTS = {  # name -> side-network overrides of the shipped preset
    UNTRAINED: {"reduction": 4, "memory_attention": "joint"},
    "r=4 joint (shipped)": {"reduction": 4, "memory_attention": "joint"},
    "r=4 gated": {"reduction": 4, "memory_attention": "gated"},
    "r=2 joint": {"reduction": 2, "memory_attention": "joint"},
    "r=8 joint": {"reduction": 8, "memory_attention": "joint"},
}


def recall_docs(backbone, n: int, segment: int, seed: int = 1234) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` fixed recall documents of 2-4 segments from the validation books, the fact in
    the segments before the last (so only memory can hold it)."""
    books = tokenized_books(backbone, "validation")
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        segs = int(rng.integers(2, 5))
        docs.append(recall_document(backbone.tokenizer, books, segs * segment, rng, fact_before=(segs - 1) * segment))
    return docs


@torch.no_grad()
def recall_ppl(model: LongSideModel, docs, segment: int) -> dict:
    """Answer perplexity of the recall documents, earlier segments in memory or not."""
    out = {}
    for mode, use in (("memory", True), ("no_memory", False)):
        nll, n = 0.0, 0
        for ids, labels in docs:
            model.reset_memory()
            segs = torch.from_numpy(ids).view(-1, segment)
            lab = torch.from_numpy(labels).view(-1, segment)
            for s in segs[:-1] if use else ():
                model(s[None], use_memory=True, write_memory=True, return_logits=False)
            r = model(segs[-1][None], labels=lab[-1][None], use_memory=use, write_memory=False,
                      return_logits=False)
            nll += r.loss.item() * r.n_tokens
            n += r.n_tokens
        out[mode] = math.exp(nll / n)
    model.reset_memory()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--recall-docs", type=int, default=16)
    p.add_argument("--feature-cache", help="backbone features, replayed by every variant after the first")
    p.add_argument("--json", default="results/side_ablation.json")
    p.add_argument("--plot", default="results/side_ablation.png")
    p.add_argument("--replot", action="store_true", help="only redraw --plot from the report in --json")
    args = p.parse_args()
    if args.replot:
        plot(json.loads(Path(args.json).read_text()), args.plot)
        return

    backbone = load_backbone("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="side_ablation_"))
    docs = recall_docs(backbone, args.recall_docs, preset("smollm2-135m").segment)
    results = []
    try:
        for name in args.variants:
            cfg = preset("smollm2-135m", max_steps=args.steps, eval_every=args.steps, save_every=args.steps,
                         out=str(work / "run"), feature_cache=args.feature_cache,
                         side={**VARIANTS[name], "token_cache": False})
            started = time.time()
            if name == UNTRAINED:
                model = LongSideModel(backbone, cfg.side)
                attach_feature_cache(model, cfg)  # the same bf16-rounded features the trained variants validate on
                final = {"step": 0, **validate(model, tokenized_books(backbone, "validation"), cfg.segment,
                                                cfg.eval_segments)}
                losses = []
            else:
                final = train(cfg, backbone=backbone)
                model = LongSideModel.from_pretrained(work / "run" / "model", backbone=backbone)
                losses = [h["loss"] for h in json.loads((work / "run" / "history.json").read_text())]
                shutil.rmtree(work / "run")
            wall = time.time() - started
            tail = losses[-max(1, len(losses) // 4):]
            model.feature_cache = None  # the recall documents are encoded afresh: the same for every variant
            recall = recall_ppl(model, docs, cfg.segment)
            row = {"variant": name, "side": VARIANTS[name], "steps": final["step"],
                   "trainable_params": sum(x.numel() for x in model.side.parameters() if x.requires_grad),
                   "train_loss_last_quarter": float(np.mean(tail)) if tail else None,
                   "val_ppl_memory": final["ppl_memory"], "val_ppl_no_memory": final["ppl_no_memory"],
                   "recall_ppl_memory": recall["memory"], "recall_ppl_no_memory": recall["no_memory"],
                   "s_per_step": wall / final["step"] if final["step"] else None, "wall_s": wall,
                   "feature_cache": final.get("feature_cache"), "loss_curve": losses}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "loss_curve"}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {"experiment": "side_ablation", "steps": args.steps, "git_commit": git_commit(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "base_preset": "smollm2-135m",
              "token_cache": False, "recall_docs": args.recall_docs, "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    plot(report, args.plot)


def plot(report: dict, path: str | Path) -> None:
    """Left: training loss of each variant; right: its difference from the first trained
    variant's at the same step (the documents' swings cancel; what is left is the variant)."""
    plt = pyplot()
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.5))
    trained = [r for r in report["results"] if r["loss_curve"]]
    w = max(1, min(len(r["loss_curve"]) for r in trained) // 15) if trained else 1
    smooth = lambda c: np.convolve(c, np.ones(w) / w, mode="valid")  # noqa: E731
    for row in report["results"]:
        c = row["loss_curve"]
        label = f"{row['variant']} (val ppl {row['val_ppl_memory']:.2f})"
        if not c:  # the untrained baseline has a validation loss, no training curve
            ax.axhline(math.log(row["val_ppl_memory"]), ls=":", color="gray", label=label + ", validation")
            continue
        steps = range(w, len(c) + 1)
        ax.plot(steps, smooth(c), label=label)
        ref = trained[0]["loss_curve"]
        n = min(len(c), len(ref))
        dx.plot(range(w, n + 1), smooth(np.subtract(c[:n], ref[:n])), label=row["variant"])
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving mean of {w} steps)")
    ax.legend(fontsize=8)
    if trained:
        dx.axhline(0, color="gray", lw=0.5)
        dx.set_title(f"minus {trained[0]['variant']}", fontsize=9)
    dx.set_xlabel("step")
    dx.set_ylabel("training loss difference")
    dx.legend(fontsize=8)
    fig.suptitle(f"side network variants, {report['steps']} steps each, same documents\n"
                 f"commit {str(report.get('git_commit'))[:7]}", fontsize=9)
    save_figure(plt, fig, path)


if __name__ == "__main__":
    main()
