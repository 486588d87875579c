"""`longside fit-cache`: fit the token cache's temperature and gate on validation books.

Loads a checkpoint (default: the shipped one), gives it a token cache (and the exact-match
copy read, `--copy-k`) if it has none, fits the reader on the validation split (never the
test books), together with synthetic recall documents, and saves the result:

    longside fit-cache --out runs/fitted --copy-k 16 --json results/fit_token_cache.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from longside.errors import LongsideError
    from longside.loading import load_model
    from longside.token_cache import TokenCacheReader, fit_token_cache, recall_tasks
    from longside.train import tokenized_books

    p = argparse.ArgumentParser(prog="longside fit-cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the shipped one)")
    p.add_argument("--out", required=True, help="where to save the fitted checkpoint")
    p.add_argument("--books", type=int, default=4, help="validation books to read (default 4)")
    p.add_argument("--segments", type=int, default=12, help="segments read per book (default 12)")
    p.add_argument("--steps", type=int, default=400, help="optimisation steps (default 400)")
    p.add_argument("--tasks", type=int, default=32,
                   help="synthetic recall documents (numbers stated once, asked for 1-3 windows later, in "
                        "validation-book filler, with wordings other than the pass-key evaluation's) fitted "
                        "alongside the books (default 32; 0: books only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the recall documents")
    p.add_argument("--copy-k", type=int, help="exact-match candidates for the copy read (0: off; "
                   "default: the checkpoint's setting, 16 for one without it)")
    p.add_argument("--json", help="write the fit report here")
    args = p.parse_args(argv)
    started = time.time()
    model, note = load_model(args.model)
    old = model.side.token_reader
    copy_k = args.copy_k if args.copy_k is not None else (model.config.token_copy_k if old is not None else 16)
    if copy_k < 0 or args.tasks < 0:
        raise LongsideError(f"--copy-k and --tasks must be >= 0, got {copy_k} and {args.tasks}")
    model.config.token_cache, model.config.token_copy_k = True, copy_k
    if old is None or old.copy != (copy_k > 0):  # keep what was fitted of the neighbour gate
        model.side.token_reader = TokenCacheReader(copy=copy_k > 0)
        if old is not None:
            model.side.token_reader.load_state_dict({k: v for k, v in old.state_dict().items()
                                                     if not k.startswith("copy_")}, strict=False)
    books = tokenized_books(model.backbone, "validation")[: args.books]
    tasks = recall_tasks(model.backbone.tokenizer, books, args.tasks, model.config.window, seed=args.seed)
    result = fit_token_cache(model, books, segments=args.segments, steps=args.steps, tasks=tasks)
    model.save_pretrained(args.out)
    result.update(model=note, out=str(args.out), wall_s=round(time.time() - started, 1))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
