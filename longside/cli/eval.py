"""`longside eval NAME`: run one evaluation (or `all`), write its JSON report and plot.

    longside eval ppl --json out/ppl.json --plot out/ppl.png
    longside eval all --quick            # a health check of all four, small
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path

from longside.config import parse_blocks
from longside.eval.common import EvalError, load_model, write_json
from longside.paths import check_output_file
from longside.provenance import RunRecord

# name -> (module, config class, what it measures)
EVALUATIONS = {
    "ppl": ("longside.eval.ppl", "PplConfig", "perplexity of held-out books by position, memory 0/4k/16k/64k"),
    "chapterbreak": ("longside.eval.chapterbreak", "ChapterBreakConfig",
                     "suffix identification after 4k-32k-token prefixes (6 candidates)"),
    "icl": ("longside.eval.icl", "IclConfig", "many-shot in-context learning, demonstrations in memory"),
    "passkey": ("longside.eval.passkey", "PasskeyConfig", "pass key retrieval, 4k-64k tokens, several depths"),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="longside checkpoint directory (default: the shipped one; without it, an "
                                   "untrained side network, reported as such)")
    p.add_argument("--data", help="your own data instead of the prepared corpora (see each evaluation's help)")
    p.add_argument("--json", help="write the report here (default: print it)")
    p.add_argument("--plot", help="write the figure here (.png; for `all`, one file per evaluation)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--quick", action="store_true", help="a small version, for tests and health checks")
    p.add_argument("--backbone-memory", metavar="BLOCKS",
                   help="backbone blocks that read memory themselves, e.g. 15-29 (training-free; default: the "
                        "checkpoint's setting)")
    p.add_argument("--query-maps", choices=("on", "off"), default="on",
                   help="off: backbone memory searches and scores memory with each block's own query, leaving out "
                        "the checkpoint's trained query maps (`longside fit-query-maps`); on (default): its setting")
    p.add_argument("--window-carry", type=int, metavar="TOKENS",
                   help="carry the last TOKENS of each segment into the next one's window, so no segment starts "
                        "cold (default: the checkpoint's setting, 256 for the shipped one; 0: every segment starts "
                        "empty)")
    p.add_argument("--memory-sinks", type=int, metavar="TOKENS",
                   help="leave each forward's first TOKENS (the backbone's attention sinks) out of memory "
                        "attention's bank (default: the checkpoint's setting, 0 for the shipped one)")
    p.add_argument("--memory-distance", type=int, metavar="TOKENS",
                   help="memory attention scores memory keys as if they sat TOKENS before the query (rotary; "
                        "default: the checkpoint's setting, 0 = position-free for the shipped one)")
    p.add_argument("--token-cache", choices=("on", "nocopy", "off"), default="on",
                   help="off: leave the token cache out (memory attention alone reads memory); nocopy: leave out "
                        "only its exact-match copy read (the neighbour vote stays); on (default): the checkpoint's "
                        "setting")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longside eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True, metavar="NAME")
    for name, (module, _, help_) in EVALUATIONS.items():
        p = sub.add_parser(name, help=help_, description=importlib.import_module(module).__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p)
        importlib.import_module(module).add_arguments(p)
    _common(sub.add_parser("all", help="all four evaluations in turn (use with --quick)"))
    return parser


def make_config(name: str, args: argparse.Namespace):
    """The evaluation's config: full or quick defaults, then any option given on the line."""
    module, cls_name, _ = EVALUATIONS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    config = cls.quick() if args.quick else cls()
    changes = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            changes[f.name] = tuple(value) if isinstance(value, list) else value
    if getattr(args, "long", False):
        changes["lengths"] = tuple(changes.get("lengths", config.lengths)) + (131072, 262144)
    return dataclasses.replace(config, **changes)


def _plot_path(plot: str | None, name: str, several: bool) -> Path | None:
    if plot is None:
        return None
    path = Path(plot)
    if path.suffix.lower() != ".png":
        raise EvalError(f"--plot wants a .png path, got {plot}")
    return path.with_name(f"{path.stem}_{name}.png") if several else path


def apply_token_cache(model, info: dict, mode: str) -> None:
    """`--token-cache`: "off" or "nocopy" drop that much of the token cache from `model`;
    `info` records what the run used."""
    if mode not in ("on", "nocopy", "off"):
        raise EvalError(f"--token-cache must be on, nocopy or off, not {mode!r}")
    if mode != "on":
        model.drop_token_cache(only_copy=mode == "nocopy")
        info["side_config"] = dataclasses.asdict(model.config)
    cfg = model.config
    info["token_cache"] = "off" if not cfg.token_cache else ("nocopy" if not cfg.token_copy_k else "on")


def main(argv: list[str]) -> int:
    run = RunRecord.start(["longside", "eval", *argv])
    args = build_parser().parse_args(argv)
    names = list(EVALUATIONS) if args.name == "all" else [args.name]
    if args.data is not None and len(names) > 1:
        raise EvalError("--data names one data set; give it to a single evaluation, not `all`")
    if args.data is not None and not Path(args.data).exists():
        raise EvalError(f"--data {args.data} does not exist")
    configs = {n: make_config(n, args) for n in names}
    plots = {n: _plot_path(args.plot, n, len(names) > 1) for n in names}  # bad paths fail before the work
    check_output_file(args.json, "--json")
    check_output_file(getattr(args, "resume", None), "--resume")
    for plot in plots.values():
        check_output_file(plot, "--plot")
    model, info = load_model(args.model)
    if args.backbone_memory is not None:
        model.use_backbone_memory(parse_blocks(args.backbone_memory))
        info["side_config"] = dataclasses.asdict(model.config)  # what the run used, not what was loaded
    for value, use in ((args.window_carry, model.use_window_carry), (args.memory_sinks, model.use_memory_sink_tokens),
                       (args.memory_distance, model.use_memory_distance)):
        if value is not None:
            use(value)
            info["side_config"] = dataclasses.asdict(model.config)
    apply_token_cache(model, info, args.token_cache)
    if args.query_maps == "off":
        model.use_query_maps({})
    info["backbone_memory_layers"] = model.config.backbone_memory_layers
    info["query_maps"] = sorted(b for b in model.query_maps if b in model.config.backbone_memory_layers)
    reports = {}
    for name in names:
        module = importlib.import_module(EVALUATIONS[name][0])
        report = module.run(model, info, configs[name], data=args.data)
        plot = plots[name]
        if plot is not None:
            module.plot(report, plot)
            print(f"longside eval {name}: plot -> {plot}", file=sys.stderr)
        report["provenance"] = run.finish()
        reports[name] = report
    out = reports[names[0]] if len(names) == 1 else {"evaluation": "all", "reports": reports}
    if args.json:
        write_json(out, args.json)
        print(f"longside eval {args.name}: report -> {args.json}", file=sys.stderr)
    else:
        print(json.dumps(out, indent=1))
    return 0
