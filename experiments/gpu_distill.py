"""Distillation training sized to a wall-time budget, for a GPU machine lent for minutes.

    python experiments/gpu_distill.py --minutes 6 --batch-size 8 --out /tmp/gpu_distill --json /tmp/gpu_distill.json

It is `longside train --preset smollm2-135m-distill-rotary` (the shipped side network
trained further against the backbone with SmolLM2's native 8k window in view, memory read at
a rotary distance; `--preset smollm2-135m-distill` for the position-free read), with three changes
for a GPU: rows of `--batch-size` documents at once, teacher targets computed when read
and never stored (`teacher_store=False`; a GPU computes a document's in milliseconds,
storing them would fill a disk at ~20 MB per document), and the backbone as its
dequantized float32 copy (`quantize="fp32"`: the same weights the native 4-bit layers
multiply with; TF32 matrix products on CUDA).

A warm-up + cosine schedule must know its length, so a short probe run (its own
directory, discarded) measures steps per second and one validation's seconds first; the
real run then plans `max_steps` to end inside `--minutes` with its validations counted,
and stops at the time limit in any case. The JSON holds the probe, the plan, the final
metrics (or the error) and where the machine and versions came from; with `--copy-to` it
is copied there whatever happened. Runs on CPU too, slowly (it ran end to end on this
project's CPU with `--batch-size 2 --probe-steps 3` in a copy of the device layout).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from longside.backbone import load_backbone
from longside.provenance import RunRecord
from longside.training.config import preset
from longside.training.train import train


def _clock(h: dict) -> float:
    """Seconds into the run at a history row's step, before that step's validation."""
    return h["tokens"] / h["tokens_per_s"]


def _steps_per_s(history: list[dict], skip: int) -> float:
    """Steady steps/s from a run's history; the first `skip` steps (CUDA start-up) are left out."""
    rows = [h for h in history if h.get("tokens_per_s")]
    a, b = rows[min(skip, len(rows) - 2)], rows[-1]
    return (b["step"] - a["step"]) / max(_clock(b) - _clock(a), 1e-9)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="wall time for the whole script")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--preset", default="smollm2-135m-distill-rotary",
                   help="a distillation preset (default: memory read at a rotary distance with the backbone's query)")
    p.add_argument("--lr", type=float, default=None, help="default: the preset's")
    p.add_argument("--probe-steps", type=int, default=30)
    p.add_argument("--reserve-s", type=float, default=45.0, help="kept for the final validation and save")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--quantize", default="fp32")
    p.add_argument("--out", required=True, help="checkpoint directory of the real run")
    p.add_argument("--json", required=True)
    p.add_argument("--copy-to", help="also copy the final side weights, config and history here")
    p.add_argument("--commit", help="the commit this tree is, where it is a copy without git (a device machine)")
    args = p.parse_args(argv)
    t0, record = time.time(), RunRecord.start()
    out, report = Path(args.out), Path(args.json)
    report.parent.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if cuda:  # float32 backbone and side network, TF32 products: the side network trains in fp32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result: dict = {"device": torch.cuda.get_device_name() if cuda else platform.processor(), "commit": args.commit}
    backbone = load_backbone("smollm2-135m", quantize=args.quantize)
    result["backbone_load_s"] = round(time.time() - t0, 1)
    common = {"batch_size": args.batch_size, "quantize": args.quantize, "teacher_store": False,
              **({"lr": args.lr} if args.lr else {})}

    try:
        probe_dir = out.with_name(out.name + "-probe")
        probe = train(preset(args.preset, **common, out=str(probe_dir), max_steps=args.probe_steps,
                             eval_every=10 ** 6, save_every=10 ** 6), backbone=backbone, progress=False)
        history = json.loads((probe_dir / "history.json").read_text())
        rate = _steps_per_s(history, skip=min(5, args.probe_steps // 3))
        validation_s = max(probe["wall_s"] - _clock(history[-1]), 0.0)  # the probe's one validation (+ save)
        shutil.rmtree(probe_dir, ignore_errors=True)
        left = args.minutes * 60 - (time.time() - t0) - args.reserve_s
        # each step costs 1/rate s, and one step in eval_every adds a validation
        steps = max(args.probe_steps, int(left * 0.95 / (1 / rate + validation_s / args.eval_every)))
        result["probe"] = {"steps": args.probe_steps, "wall_s": round(probe["wall_s"], 1), "steps_per_s": round(rate, 3),
                           "validation_s": round(validation_s, 1), "tokens_per_step": args.batch_size * 1024}
        result["plan"] = {"max_steps": steps, "seconds_left": round(left, 1)}
        print(json.dumps(result, indent=1), flush=True)
        report.write_text(json.dumps(result, indent=1))
        cfg = preset(args.preset, **common, out=str(out), max_steps=steps, eval_every=args.eval_every,
                     save_every=args.save_every, warmup_steps=max(20, steps // 50))
        result["final"] = train(cfg, max_minutes=max(left, 30) / 60, backbone=backbone, progress=False)
    except Exception:  # the error goes into the report; the last checkpoint saved is still copied below
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr, flush=True)
    result["run"] = record.finish()
    report.write_text(json.dumps(result, indent=1))
    if args.copy_to:
        dst = Path(args.copy_to)
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(report, dst / report.name)
        for f in ("model/side_model.safetensors", "model/side_config.json", "history.json", "train_config.json"):
            if (out / f).exists():
                shutil.copy(out / f, dst / Path(f).name)
    print(json.dumps(result, indent=1))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
