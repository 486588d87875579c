"""`longside train`: train the side network with the backbone frozen."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longside.errors import LongsideError
from longside.model import LongSideModel
from longside.paths import check_output_dir, check_output_file
from longside.training.config import PRESETS, TrainConfig, preset
from longside.training.train import train


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="longside train", description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help=f"one of: {', '.join(PRESETS)} (default smollm2-135m)")
    src.add_argument("--config", help="a JSON file of TrainConfig fields (side network under \"side\")")
    p.add_argument("--out", help="checkpoint directory (default from the preset)")
    p.add_argument("--resume", help="a checkpoint directory written by a previous run")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-minutes", type=float, help="stop (and save) after this much wall time")
    p.add_argument("--feature-cache", help="keep the backbone's features of each segment in this directory and "
                   "replay them when the segment comes back (further epochs, validation, other side configs)")
    p.add_argument("--feature-cache-gb", type=float, help="stop adding to the feature cache beyond this size "
                   "(default 20)")
    p.add_argument("--distill", action="store_true", help="also train against the long-context backbone (teacher "
                   "targets, cached; documents are cut to its window). Without --preset: smollm2-135m-distill, "
                   "which trains the shipped checkpoint further")
    p.add_argument("--ship", help="also write the final side weights (fp16) to this directory")
    p.add_argument("--json", help="write the final metrics here")
    args = p.parse_args(argv)
    check_output_dir(args.out, "--out")
    check_output_file(args.json, "--json")
    overrides = {}
    if args.out:
        overrides["out"] = args.out
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    if args.feature_cache:
        overrides["feature_cache"] = args.feature_cache
    if args.feature_cache_gb is not None:
        overrides["feature_cache_gb"] = args.feature_cache_gb
    if args.config:
        try:
            raw = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LongsideError(f"no config file at {args.config}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LongsideError(f"{args.config} is not valid UTF-8 JSON: {e}") from None
        if not isinstance(raw, dict):
            raise LongsideError(f"{args.config} must hold a JSON object of TrainConfig fields, not "
                                f"{type(raw).__name__}")
        cfg = TrainConfig.from_dict({**raw, **overrides, **({"distill": True} if args.distill else {})})
    else:
        name = args.preset or ("smollm2-135m-distill" if args.distill else "smollm2-135m")
        raw = preset(name, **overrides)
        if args.distill and not raw.distill:  # documents cut to the teacher's window
            fit = raw.teacher_window // raw.segment
            overrides.update(distill=True, max_book_segments=min(raw.max_book_segments, fit),
                             synthetic_max_segments=min(raw.synthetic_max_segments, fit))
        cfg = preset(name, **overrides)
    result = train(cfg, resume=args.resume, max_minutes=args.max_minutes)
    if args.ship:
        LongSideModel.from_pretrained(Path(cfg.out) / "model").save_pretrained(args.ship)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
