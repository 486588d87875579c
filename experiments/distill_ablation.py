"""Which distillation mix? Short runs from the shipped checkpoint, side by side.

Each variant is the preset `smollm2-135m-distill` (the shipped side network trained
further on 8-segment documents whose teacher, the bare backbone at its native 8k window,
sees the whole document) with other loss weights: next-token loss alone, + the residual
regression (mse) and the KL to the teacher's top-k, + the memory layer's own target
(attn), or all of them. All variants see the same
documents in the same order from the same start; the teacher targets and the backbone's
features are computed once and replayed (`--feature-cache`, the teacher cache under the
cache directory). A first row is the shipped checkpoint untrained further.

Measured per variant, with the training loop's own `validate` (segments 2..n of each of
the four validation books, n = `--eval-segments`): perplexity with memory (everything
on), with memory attention alone (token cache left out of the read), and without memory;
the side network's own memory gain is 1 - ppl(memory attention alone) / ppl(no memory).
Also the last quarter's mean training mse and kl. JSON with provenance and a bar plot.

    python experiments/distill_ablation.py --steps 60 --feature-cache /work/fc \\
        --json results/distill_ablation.json --plot results/distill_ablation.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from longside.eval.common import pyplot, save_figure

from longside.backbone import load_backbone
from longside.model import LongSideModel
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.training.config import preset
from longside.training.data import tokenized_books
from longside.training.train import train, validate

SHIPPED = "shipped (no further training)"
VARIANTS = {  # name -> loss weights (lm_weight, distill_mse, distill_kl, distill_attn)
    "next-token only": (1.0, 0.0, 0.0, 0.0),
    "next-token + mse + kl": (1.0, 1.0, 1.0, 0.0),
    "next-token + attn": (1.0, 0.0, 0.0, 1.0),
    "next-token + mse + kl + attn (preset)": (1.0, 1.0, 1.0, 1.0),
}


def side_gain(m: dict) -> float:
    """How much lower memory attention alone makes perplexity than no memory, in %."""
    return 100 * (1 - m["ppl_memory_no_token_cache"] / m["ppl_no_memory"])


def _mean(xs: list[float]) -> float | None:
    """None where a variant never computed the term (next-token only has no teacher terms)."""
    return float(np.mean(xs)) if xs else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-segments", type=int, default=6)
    p.add_argument("--feature-cache", required=True)
    p.add_argument("--variants", nargs="+", choices=[SHIPPED, *VARIANTS], default=[SHIPPED, *VARIANTS])
    p.add_argument("--json", required=True)
    p.add_argument("--plot")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    run = RunRecord.start()
    backbone = load_backbone("smollm2-135m")
    rows = []
    for name in args.variants:
        if name == SHIPPED:
            model = LongSideModel.from_pretrained(backbone=backbone)
            m = validate(model, tokenized_books(backbone, "validation"), 1024, args.eval_segments)
            rows.append({"variant": name, **m, "side_memory_gain_pct": side_gain(m)})
            print(json.dumps(rows[-1]))
            continue
        lm, mse, kl, attn = VARIANTS[name]
        with tempfile.TemporaryDirectory() as out:
            cfg = preset("smollm2-135m-distill", max_steps=args.steps, eval_every=args.steps, save_every=args.steps,
                         eval_segments=args.eval_segments, warmup_steps=min(20, args.steps // 3),
                         lm_weight=lm, distill_mse=mse, distill_kl=kl, distill_attn=attn, out=out,
                         feature_cache=args.feature_cache)
            result = train(cfg, backbone=backbone, progress=True)
            history = json.loads((Path(out) / "history.json").read_text())
        tail = history[-max(1, len(history) // 4):]
        rows.append({"variant": name, "weights": {"lm": lm, "mse": mse, "kl": kl, "attn": attn},
                     **{k: result[k] for k in ("ppl_memory", "ppl_memory_no_token_cache", "ppl_no_memory")},
                     "side_memory_gain_pct": side_gain(result),
                     **{f"train_{k}_last_quarter": _mean([h[k] for h in tail if k in h])
                        for k in ("lm", "mse", "kl", "attn")},
                     "wall_s": result["wall_s"]})
        print(json.dumps(rows[-1]))
    report = {"experiment": "distill_ablation", "steps": args.steps, "eval_segments": args.eval_segments,
              "preset": "smollm2-135m-distill", "rows": rows, "provenance": run.finish()}
    write_json(report, args.json)
    if args.plot:
        plot(report, args.plot)


def plot(report: dict, path) -> None:
    plt = pyplot()
    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    names = [r["variant"] for r in rows]
    axes[0].barh(names, [r["side_memory_gain_pct"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("memory attention alone: % lower perplexity than no memory")
    axes[1].barh(names, [r["ppl_memory"] for r in rows], color="tab:green")
    axes[1].set_xlabel("validation perplexity, everything on")
    lo = min(r["ppl_memory"] for r in rows)
    axes[1].set_xlim(lo * 0.97, max(r["ppl_memory"] for r in rows) * 1.01)
    axes[1].set_yticks([])
    fig.suptitle(f"distillation mixes, {report['steps']} steps each from the shipped checkpoint", fontsize=10)
    save_figure(plt, fig, path)


if __name__ == "__main__":
    main()
