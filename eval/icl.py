"""`longside eval icl`: many-shot in-context learning with demonstrations in memory.

For each task and seed, `k` demonstrations sit in the local window before the query and
`N` more (disjoint) are written to memory first (LongMem used k = 20, N = 2000). Each
demonstration reads `Input: TEXT\\nLabel: WORD\\n\\n`; the query ends at `Label:`. Two
protocols score the next-token logits after the query:

- `label`: the label word with the highest logit among the task's label words;
- `open`: LongMem's open-vocabulary protocol: correct only if the true label word is the
  argmax over the whole vocabulary.

Rows: the bare backbone with the k demonstrations only, longside with memory off (same
prompt), longside with the N demonstrations in memory. Test examples are fixed by
`--seed`; the seeds vary the demonstrations (`seeds` of them, mean and std reported).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

from longside.eval.common import (
    EvalError,
    backbone_prefix_logits,
    encode,
    eval_window,
    mean_std,
    memorize,
    prefix_logits,
    pyplot,
    report,
    save_figure,
    title_of,
)
from tqdm.auto import tqdm

from longside.data import ICL_TASKS, load_icl, load_local_dataset

TEMPLATE = "Input: {text}\nLabel: {label}\n\n"
QUERY = "Input: {text}\nLabel:"
ROWS = ("backbone k-shot", "longside memory off", "longside memory")
PROTOCOLS = ("label", "open")


@dataclass
class IclConfig:
    window: int | None = None  # local window (default: the model's)
    tasks: tuple[str, ...] = ("mr2", "mr5", "tweets2", "amazon2", "nyt2", "source4")
    k_window: int = 20  # demonstrations in the local window
    n_memory: int = 2000  # demonstrations in memory
    n_test: int = 50  # test examples per task
    seeds: int = 6  # demonstration draws
    max_text_tokens: int | None = None  # per snippet (default: what lets k + 1 of them fit the window)
    seed: int = 0

    @classmethod
    def quick(cls) -> "IclConfig":
        return cls(window=256, k_window=4, n_memory=32, n_test=2, seeds=2)


@dataclass
class _Task:
    name: str
    labels: tuple[str, ...]
    train: list[dict]
    test: list[dict]


def _load_task(name: str, data) -> _Task:
    """A prepared task by name, or with `--data` a `datasets` folder holding a DatasetDict
    with `train` and `test` of `{text, label, label_text}` (one user task)."""
    if data is None:
        ds = load_icl(name)
        labels = ICL_TASKS[name].labels
    else:
        ds = load_local_dataset(data)
        if not hasattr(ds, "keys") or not {"train", "test"} <= set(ds.keys()):
            raise EvalError(f"{data} must be a datasets DatasetDict with 'train' and 'test' splits")
        names = {int(r["label"]): r["label_text"] for r in ds["train"]}
        if sorted(names) != list(range(len(names))):
            raise EvalError(f"{data}: labels must be 0..n-1 with a label_text each, got {sorted(names)}")
        labels = tuple(names[i] for i in range(len(names)))
    return _Task(name, labels, list(ds["train"]), list(ds["test"]))


def _label_tokens(tokenizer, labels: tuple[str, ...]) -> list[int]:
    """First token of each label word after a space; they must differ to be told apart."""
    firsts = [encode(tokenizer, " " + w)[0] for w in labels]
    if len(set(firsts)) != len(firsts):
        raise EvalError(f"label words {labels} share a first token in this tokenizer; choose other words")
    return firsts


def _texts(tokenizer, rows: list[dict], max_tokens: int) -> list[str]:
    """Snippets cut to `max_tokens` tokens, so k + 1 of them always fit the window."""
    out = []
    for r in rows:
        ids = encode(tokenizer, r["text"].strip())
        out.append(tokenizer.decode(ids[:max_tokens]) if len(ids) > max_tokens else r["text"].strip())
    return out


def _max_text_tokens(tokenizer, config: IclConfig, window: int, labels: tuple[str, ...]) -> int:
    """Snippet budget: the window shared by k demonstrations and the query, less the
    template's own tokens (+2 for tokens that merge differently once text is inside)."""
    overhead = max(len(encode(tokenizer, TEMPLATE.format(text="", label=w))) for w in labels) + 2
    budget = window // (config.k_window + 1) - overhead
    if config.max_text_tokens is not None:
        if config.max_text_tokens > budget:
            raise EvalError(f"{config.k_window} demonstrations + a query of {config.max_text_tokens} tokens each "
                            f"do not fit a window of {window}; lower --k-window or --max-text-tokens")
        return config.max_text_tokens
    if budget < 8:
        raise EvalError(f"{config.k_window} demonstrations leave under 8 tokens per snippet in a window of "
                        f"{window}; lower --k-window")
    return budget


def run(model, info: dict, config: IclConfig, data=None) -> dict:
    """Run every task and seed; returns the report with accuracies per task, row, protocol."""
    started = time.time()
    window = eval_window(model, config.window)
    backbone, tok = model.backbone, model.backbone.tokenizer
    names = (Path(data).name,) if data is not None else config.tasks
    tasks = [_load_task(n, data) for n in names]
    per_task: dict[str, dict] = {}
    steps = len(tasks) * config.seeds * config.n_test
    with tqdm(total=steps, desc="icl", unit="query", leave=False) as bar:
        for task in tasks:
            label_ids = _label_tokens(tok, task.labels)
            max_text = _max_text_tokens(tok, config, window, task.labels)
            if len(task.train) < config.k_window + config.n_memory:
                raise EvalError(f"task {task.name} has {len(task.train)} training examples, fewer than "
                                f"k + N = {config.k_window + config.n_memory}")
            test = random.Random(config.seed).sample(task.test, min(config.n_test, len(task.test)))
            queries = [encode(tok, QUERY.format(text=t)) for t in _texts(tok, test, max_text)]
            acc = {r: {p: [] for p in PROTOCOLS} for r in ROWS}
            for s in range(config.seeds):
                rng = random.Random(f"{config.seed}/{task.name}/{s}")
                demos = rng.sample(task.train, config.k_window + config.n_memory)
                texts = _texts(tok, demos, max_text)
                shots = [TEMPLATE.format(text=t, label=task.labels[d["label"]]) for t, d in zip(texts, demos)]
                local = encode(tok, "".join(shots[:config.k_window]))
                model.reset_memory()
                memorize(model, encode(tok, "".join(shots[config.k_window:])), window)
                hits = {r: {p: 0 for p in PROTOCOLS} for r in ROWS}
                for q in queries:
                    if len(local) + len(q) > window:
                        raise EvalError(f"a prompt of {len(local) + len(q)} tokens exceeds the window {window}; "
                                        "lower --max-text-tokens")
                # the demonstrations are run once per row; each query continues a copy of them
                last = {ROWS[0]: backbone_prefix_logits(backbone, local, queries, last_only=True),
                        ROWS[1]: prefix_logits(model, local, queries, use_memory=False, last_only=True),
                        ROWS[2]: prefix_logits(model, local, queries, use_memory=True, last_only=True)}
                for i, ex in enumerate(test):
                    gold = label_ids[ex["label"]]
                    for r, per_query in last.items():
                        logits = per_query[i]
                        hits[r]["label"] += int(label_ids[int(logits[label_ids].argmax())] == gold)
                        hits[r]["open"] += int(int(logits.argmax()) == gold)
                bar.update(len(test))
                for r in ROWS:
                    for p in PROTOCOLS:
                        acc[r][p].append(hits[r][p] / len(test))
            model.reset_memory()
            per_task[task.name] = {
                "labels": list(task.labels), "n_test": len(test), "max_text_tokens": max_text,
                "window_demo_tokens": len(local),
                "rows": {r: {p: {"per_seed": acc[r][p], "mean": mean_std(acc[r][p])[0], "std": mean_std(acc[r][p])[1]}
                             for p in PROTOCOLS} for r in ROWS}}
    average = {}
    for r in ROWS:
        average[r] = {}
        for p in PROTOCOLS:
            # the task average per seed, then its spread over seeds
            seeds = [sum(t["rows"][r][p]["per_seed"][s] for t in per_task.values()) / len(per_task)
                     for s in range(config.seeds)]
            m, sd = mean_std(seeds)
            average[r][p] = {"mean": m, "std": sd}
    results = {"tasks": per_task, "average": average,
               "chance": {n: 1 / len(t["labels"]) for n, t in per_task.items()}}
    cfg = dataclasses.replace(config, window=window, tasks=tuple(names))
    data_id = {"icl": str(data) if data is not None else "prepared", "tasks": list(names)}
    return report("icl", cfg, info, data_id, results, started)


def plot(result: dict, path) -> None:
    """Accuracy per task (and average) per row, one panel per protocol, std as error bars."""
    plt = pyplot()
    res = result["results"]
    tasks = list(res["tasks"]) + ["average"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    width = 0.8 / len(ROWS)
    for ax, p in zip(axes, PROTOCOLS):
        for i, r in enumerate(ROWS):
            stats = [res["tasks"][t]["rows"][r][p] if t != "average" else res["average"][r][p] for t in tasks]
            xs = [j + (i - (len(ROWS) - 1) / 2) * width for j in range(len(tasks))]
            ax.bar(xs, [100 * s["mean"] for s in stats], width, yerr=[100 * s["std"] for s in stats], label=r,
                   capsize=2)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30)
        ax.set_title(f"protocol: {p}")
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"many-shot ICL, k={cfg['k_window']} in window, N={cfg['n_memory']} in memory, "
                 f"{cfg['seeds']} seeds\n" + title_of(result), fontsize=9)
    save_figure(plt, fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, help="local window (default: the model's)")
    p.add_argument("--tasks", nargs="+", help="prepared tasks (default: all six)")
    p.add_argument("--k-window", type=int, help="demonstrations in the window (default 20)")
    p.add_argument("--n-memory", type=int, help="demonstrations in memory (default 2000)")
    p.add_argument("--n-test", type=int, help="test examples per task (default 50)")
    p.add_argument("--seeds", type=int, help="demonstration draws (default 6)")
    p.add_argument("--max-text-tokens", type=int, help="tokens per snippet (default: fit the window)")


__all__ = ["IclConfig", "PROTOCOLS", "ROWS", "add_arguments", "plot", "run"]
