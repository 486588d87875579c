"""Distillation runs side by side: the memory-layer error per stretch of steps, and each
validation's perplexities with memory attention's own gain.

Each run is a `name=history.json` pair (a training run's per-step history). The memory-layer
error (`attn`) is the squared error of the reader's change at the memory block against the
teacher's, over the teacher change's own size: 1.0 is what an empty read scores.

    python experiments/distill_curves.py position-free=results/train_distill_history.json \\
        sinks+distance=results/distill_sinks_distance/history.json \\
        rotary=results/distill_rotary/history.json \\
        --json results/distill_curves.json --plot results/distill_curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longside.eval.common import save_figure
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord

STRETCHES = [(2, 10), (11, 25), (26, 50), (51, 75), (76, 100), (101, 125), (126, 151), (152, 200), (201, 250),
             (251, 302), (303, 400), (401, 478)]


def summarize(history: list[dict]) -> dict:
    """Mean attn per stretch (None where the run has no such steps) and the validations."""
    attn = []
    for lo, hi in STRETCHES:
        v = [h["attn"] for h in history if lo <= h["step"] <= hi and "attn" in h]
        attn.append(round(sum(v) / len(v), 3) if v else None)
    validations = [{"step": h["step"], "memory": round(h["ppl_memory"], 3),
                    "memory_attention_alone": round(h["ppl_memory_no_token_cache"], 3),
                    "memory_off": round(h["ppl_no_memory"], 3),
                    "own_gain_pct": round(100 * (1 - h["ppl_memory_no_token_cache"] / h["ppl_no_memory"]), 2)}
                   for h in history if "ppl_memory" in h]
    return {"steps": history[-1]["step"], "attn_by_stretch": attn, "validations": validations}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=HISTORY.json")
    p.add_argument("--smooth", type=int, default=10, help="steps per point of the plotted curve")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    record = RunRecord.start(["python", "experiments/distill_curves.py", *sys.argv[1:]])
    runs, histories = {}, {}
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            p.error(f"{spec!r}: expected NAME=HISTORY.json with an existing file")
        histories[name] = json.loads(Path(path).read_text())
        runs[name] = {"history": path, **summarize(histories[name])}
    report = {"stretches": STRETCHES, "runs": runs, "provenance": record.finish()}
    print(json.dumps({k: v for k, v in report.items() if k != "provenance"}, indent=1))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for name, h in histories.items():
            rows = [r for r in h if "attn" in r]
            pts = [(rows[i]["step"], sum(r["attn"] for r in rows[i:i + args.smooth]) / len(rows[i:i + args.smooth]))
                   for i in range(0, len(rows), args.smooth)]
            ax[0].plot([s for s, _ in pts], [a for _, a in pts], label=name)
            val = runs[name]["validations"]
            ax[1].plot([v["step"] for v in val], [v["own_gain_pct"] for v in val], "o-", label=name)
        ax[0].axhline(1.0, color="grey", lw=0.8, ls="--")
        ax[0].set(yscale="log", xlabel="step", ylabel="memory-layer error (1 = empty read)",
                  title=f"reader vs teacher's change (mean of {args.smooth} steps)")
        ax[1].set(xlabel="step", ylabel="% lower perplexity", title="memory attention's own gain (validation)")
        for a in ax:
            a.legend()
        save_figure(plt, fig, args.plot)


if __name__ == "__main__":
    main()
