"""`longside fit-cache`: fit the token cache's temperature and gate on validation books.

Loads a checkpoint (default: the shipped one), gives it a token cache (and the exact-match
copy read, `--copy-k`) if it has none, fits the reader on the validation split (never the
test books), together with synthetic recall documents and, with `--classify`, many-shot
classification documents from the training books, and saves the result:

    longside fit-cache --out runs/fitted --copy-k 16 --classify 8 --json results/fit_token_cache.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from longside.data import load_books
from longside.errors import LongsideError
from longside.loading import load_model
from longside.nn.token_cache import TokenCacheReader
from longside.paths import check_output_dir, check_output_file
from longside.training.data import tokenized_books
from longside.training.fit_tasks import classification_tasks
from longside.training.token_cache_fit import fit_token_cache, recall_tasks


def main(argv: list[str]) -> int:
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
    p.add_argument("--classify", type=int, default=0,
                   help="many-shot classification documents (passages of the training books labelled by "
                        "testament, Bible section, play genre or author; longside.training.fit_tasks) fitted alongside "
                        "(default 0)")
    p.add_argument("--classify-windows", type=int, default=12, help="windows per classification document (default 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the recall and classification documents")
    p.add_argument("--copy-k", type=int, help="exact-match candidates for the copy read (0: off; "
                   "default: the checkpoint's setting, 16 for one without it)")
    p.add_argument("--json", help="write the fit report here")
    args = p.parse_args(argv)
    check_output_dir(args.out, "--out")
    check_output_file(args.json, "--json")
    started = time.time()
    model, info = load_model(args.model)
    note = info["note"]
    old = model.side.token_reader
    copy_k = args.copy_k if args.copy_k is not None else (model.config.token_copy_k if old is not None else 16)
    if copy_k < 0 or args.tasks < 0 or args.classify < 0 or args.classify_windows < 2:
        raise LongsideError(f"--copy-k, --tasks and --classify must be >= 0 and --classify-windows >= 2, got "
                            f"{copy_k}, {args.tasks}, {args.classify}, {args.classify_windows}")
    model.config.token_cache, model.config.token_copy_k, model.config.token_spread = True, copy_k, True
    if old is None or old.copy != (copy_k > 0) or not old.spread:  # keep what was fitted of the gates
        model.side.token_reader = TokenCacheReader(copy=copy_k > 0, spread=True)
        if old is not None:
            keep = {k: v for k, v in old.state_dict().items() if copy_k > 0 or not k.startswith("copy_")}
            model.side.token_reader.load_state_dict(keep, strict=False)
    books = tokenized_books(model.backbone, "validation")[: args.books]
    tasks = recall_tasks(model.backbone.tokenizer, books, args.tasks, model.config.window, seed=args.seed)
    classify = []
    if args.classify:
        classify = classification_tasks(model.backbone.tokenizer, load_books("train"), args.classify,
                                        model.config.window, windows=args.classify_windows, seed=args.seed)
    result = fit_token_cache(model, books, segments=args.segments, steps=args.steps, tasks=tasks,
                             classify=classify)
    model.save_pretrained(args.out)
    result.update(model=note, out=str(args.out), wall_s=round(time.time() - started, 1))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
