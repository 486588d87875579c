"""`longside eval passkey`: find a number stated once, far back in filler text.

A random `digits`-digit pass key is stated once at a given depth of a filler text (real
book text, or the classic repeated "The grass is green..." sentences); the text ends
with "What is the pass key? The pass key is" (or, with `--question paraphrase`, a question
that shares no phrase with the fact). A trial succeeds when, teacher-forced,
every token of the key is the model's argmax, which is exactly when greedy decoding
would produce the key.

The text up to the last `window - answer` tokens goes into memory; the rest stays
local. The baseline is the bare backbone at the same window, which only sees the key
when it falls in that last stretch; the teacher row is the bare backbone at its native
context (8192 for SmolLM2), run only where the whole text fits it: what a model that
reads memory as well as its own window could reach. Lengths count the whole context (filler, needle and
question). A memory of at least the longest length is used, so the needle is never
evicted (`--memory-tokens` to test eviction).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass

from longside.eval.common import (
    EvalError,
    book_chapters,
    encode,
    eval_window,
    load_book_data,
    pyplot,
    report,
    save_figure,
    score_after_prefix,
    score_backbone,
    title_of,
    with_capacity,
)
from tqdm.auto import tqdm

REPEAT_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
# "repeat": the question ends with the fact's own words; "paraphrase": it shares no
# phrase with the fact, so an exact-match copy of "... is" cannot start the answer
QUESTIONS = {"repeat": "\nWhat is the pass key? The pass key is",
             "paraphrase": "\nWhich number did the text ask you to remember? Answer:"}
FILLERS = ("book", "repeat")


@dataclass
class PasskeyConfig:
    window: int | None = None  # local window (default: the model's)
    lengths: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536)
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # share of the filler before the needle
    trials: int = 3  # per length and depth
    filler: str = "book"  # "book" (held-out book text) or "repeat" (the classic sentences)
    digits: int = 5
    question: str = "repeat"  # a key of QUESTIONS
    memory_tokens: int | None = None  # default: the model's capacity or the longest length, the larger
    teacher: bool = True  # the bare backbone at its native context, where the text fits
    seed: int = 0

    @classmethod
    def quick(cls) -> "PasskeyConfig":
        return cls(window=256, lengths=(512, 1024), depths=(0.25, 0.75), trials=1)


def _filler_tokens(tokenizer, config: PasskeyConfig, data) -> tuple[list[int], str]:
    """A token stream long enough for the longest length, and what it was made from."""
    need = max(config.lengths)
    if config.filler == "repeat":
        unit = encode(tokenizer, REPEAT_FILLER)
        return (unit * (need // len(unit) + 1)), "repeated sentences"
    books, source = load_book_data(data, "test")
    stream: list[int] = []
    for book in books:  # a few times the longest length is plenty of distinct filler
        for ch in book_chapters(tokenizer, book):
            stream += ch
        if len(stream) >= 4 * need:
            break
    if len(stream) < need:
        raise EvalError(f"the filler books hold {len(stream)} tokens, fewer than the longest length {need}")
    return stream, source


def run(model, info: dict, config: PasskeyConfig, data=None) -> dict:
    """Run every length x depth x trial; returns the report with accuracy tables."""
    started = time.time()
    window = eval_window(model, config.window)
    tok = model.backbone.tokenizer
    if config.filler not in FILLERS:
        raise EvalError(f"filler must be one of {FILLERS}, not {config.filler!r}")
    if not all(0.0 <= d <= 1.0 for d in config.depths):
        raise EvalError(f"depths must lie in [0, 1], got {config.depths}")
    if not 1 <= config.digits <= 12:
        raise EvalError(f"digits must be between 1 and 12, got {config.digits}")
    capacity = config.memory_tokens or max(model.config.capacity_tokens, max(config.lengths))
    memory_model = with_capacity(model, capacity)
    stream, filler_id = _filler_tokens(tok, config, data)
    if config.question not in QUESTIONS:
        raise EvalError(f"question must be one of {sorted(QUESTIONS)}, not {config.question!r}")
    question = encode(tok, QUESTIONS[config.question])
    rng = random.Random(config.seed)
    native = model.backbone.spec.max_positions
    rows = ("longside memory", f"backbone@{window}") + ((f"backbone@{native} (teacher)",) if config.teacher else ())
    trials = []
    steps = len(config.lengths) * len(config.depths) * config.trials
    with tqdm(total=steps, desc="passkey", unit="trial", leave=False) as bar:
        for L in config.lengths:
            for depth in config.depths:
                for _ in range(config.trials):
                    key = str(rng.randrange(10 ** (config.digits - 1), 10 ** config.digits))
                    needle, answer = encode(tok, NEEDLE.format(key=key)), encode(tok, " " + key)
                    n_filler = L - len(needle) - len(question)
                    if n_filler < 1:
                        raise EvalError(f"length {L} cannot hold the needle and the question; use longer lengths")
                    start = rng.randrange(len(stream) - n_filler + 1) if config.filler == "book" else 0
                    filler = stream[start:start + n_filler]
                    at = round(depth * n_filler)
                    prefix = filler[:at] + needle + filler[at:] + question
                    hit = {rows[0]: score_after_prefix(memory_model, prefix, [answer], window=window)[0].greedy,
                           rows[1]: score_backbone(model.backbone, prefix, [answer], context=window)[0].greedy}
                    if config.teacher:  # None where the text does not fit the native context
                        fits = len(prefix) + len(answer) <= native
                        hit[rows[2]] = score_backbone(model.backbone, prefix, [answer],
                                                      context=native)[0].greedy if fits else None
                    trials.append({"length": L, "depth": depth, "key": key, "needle_at": at,
                                   "needle_in_window": len(prefix) - at <= window - len(answer),
                                   **{r: None if h is None else bool(h) for r, h in hit.items()}})
                    bar.update(1)

    def acc(rs):  # None: no trial of this cell could run this row
        rs = [r for r in rs if r is not None]
        return sum(rs) / len(rs) if rs else None

    table = {r: {str(L): {str(d): acc([t[r] for t in trials if t["length"] == L and t["depth"] == d])
                          for d in config.depths} for L in config.lengths} for r in rows}
    by_length = {r: {str(L): acc([t[r] for t in trials if t["length"] == L]) for L in config.lengths} for r in rows}
    results = {"rows": list(rows), "accuracy": table, "accuracy_by_length": by_length,
               "overall": {r: acc([t[r] for t in trials]) for r in rows}, "trials": trials}
    cfg = dataclasses.replace(config, window=window, memory_tokens=capacity)
    return report("passkey", cfg, info, {"filler": filler_id}, results, started)


def plot(result: dict, path) -> None:
    """Depth-by-length accuracy heatmaps, one per row, cells annotated."""
    plt = pyplot()
    res, cfg = result["results"], result["config"]
    lengths, depths = [str(L) for L in cfg["lengths"]], [str(d) for d in cfg["depths"]]
    fig, axes = plt.subplots(1, len(res["rows"]), figsize=(5 * len(res["rows"]), 4), squeeze=False,
                             layout="constrained")
    for ax, r in zip(axes[0], res["rows"]):
        grid = [[res["accuracy"][r][L][d] for L in lengths] for d in depths]
        im = ax.imshow([[float("nan") if v is None else v for v in row] for row in grid], vmin=0, vmax=1,
                       cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "n/a" if v is None else f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        overall = res["overall"][r]
        ax.set_title(f"{r}: " + ("n/a" if overall is None else f"{100 * overall:.0f}%"), fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"pass key retrieval, {cfg['filler']} filler, window {cfg['window']}\n" + title_of(result),
                 fontsize=9)
    save_figure(plt, fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, help="local window (default: the model's)")
    p.add_argument("--lengths", type=int, nargs="+", help="context lengths (default 4096 .. 65536)")
    p.add_argument("--long", action="store_true", help="add 131072 and 262144 to the lengths")
    p.add_argument("--depths", type=float, nargs="+", help="needle depths in [0, 1] (default 0.1 .. 0.9)")
    p.add_argument("--trials", type=int, help="trials per length and depth (default 3)")
    p.add_argument("--filler", choices=FILLERS, help="book text (default) or the repeated sentences")
    p.add_argument("--digits", type=int, help="digits of the pass key (default 5)")
    p.add_argument("--question", choices=sorted(QUESTIONS),
                   help="repeat: ask with the fact's own words (default); paraphrase: with other words")
    p.add_argument("--memory-tokens", type=int, help="memory capacity (default: enough for the longest length)")
    p.add_argument("--no-teacher", dest="teacher", action="store_const", const=False,
                   help="leave out the bare backbone at its native context (the teacher row)")


__all__ = ["FILLERS", "PasskeyConfig", "add_arguments", "plot", "run"]
