"""`longside fit-cache`: fit the token cache's temperature and gate on validation books.

Loads a checkpoint (default: the shipped one), gives it a token cache if it has none,
fits the reader on the validation split (never the test books) and saves the result:

    longside fit-cache --out runs/fitted --json results/fit_token_cache.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from longside.loading import load_model
    from longside.token_cache import TokenCacheReader, fit_token_cache
    from longside.train import tokenized_books

    p = argparse.ArgumentParser(prog="longside fit-cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the shipped one)")
    p.add_argument("--out", required=True, help="where to save the fitted checkpoint")
    p.add_argument("--books", type=int, default=4, help="validation books to read (default 4)")
    p.add_argument("--segments", type=int, default=12, help="segments read per book (default 12)")
    p.add_argument("--steps", type=int, default=400, help="optimisation steps (default 400)")
    p.add_argument("--json", help="write the fit report here")
    args = p.parse_args(argv)
    started = time.time()
    model, note = load_model(args.model)
    if model.side.token_reader is None:
        model.config.token_cache = True
        model.side.token_reader = TokenCacheReader()
    books = tokenized_books(model.backbone, "validation")[: args.books]
    result = fit_token_cache(model, books, segments=args.segments, steps=args.steps)
    model.save_pretrained(args.out)
    result.update(model=note, out=str(args.out), wall_s=round(time.time() - started, 1))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
