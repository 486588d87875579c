"""The `longside` command line.

Each subcommand lives in the module that owns its work; this file only routes argv
there, so parts can grow their own options without touching one another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import longside
from longside.errors import LongsideError

# subcommand -> (module, help). `bench` and `eval` take a second word.
_COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("longside.cli.generate", "generate text (streamed) from a prompt"),
    "chat": ("longside.cli.chat", "chat with a model that remembers what it read"),
    "data": ("longside.cli.data", "prepare and inspect the corpora (prepare, stats)"),
    "train": ("longside.cli.train", "train the side network"),
    "fit-cache": ("longside.cli.fit_cache", "fit the token cache's gate on validation books"),
    "fit-query-maps": ("longside.cli.fit_query_maps", "train backbone memory's query maps against the long-context teacher"),
    "eval": ("longside.cli.eval", "evaluations: ppl, chapterbreak, icl, passkey, all"),
    "serve": ("longside.cli.serve", "an OpenAI-compatible server; every user keeps a memory"),
    "keys": ("longside.cli.keys", "API keys for `longside serve` (add, list, remove)"),
}
_BENCHES: dict[str, tuple[str, str]] = {
    "kernels": ("longside.bench.kernels", "NF4 matmul kernels against fp32 and bitsandbytes"),
    "memory": ("longside.bench.memory", "memory bank add/search/evict/save at 65k-1M tokens"),
    "train": ("longside.bench.train", "training step cost: side tuning vs QLoRA/LoRA/full"),
    "generate": ("longside.bench.generate", "prefill/decode speed with and without memory"),
    "serve": ("longside.bench.serve", "users with their own memories: batched vs one by one, restart, isolation"),
}


def _run(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            print(f"longside: this command is not available in this version ({module} missing)",
                  file=sys.stderr)
            return 2
        raise
    return int(mod.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    lines = [f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items()]
    lines.append(f"  {'bench':<10} benchmarks printing JSON: " + ", ".join(_BENCHES))
    parser = argparse.ArgumentParser(
        prog="longside",
        description="Long-term memory for a frozen 4-bit LLM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(lines) + "\n\n`longside COMMAND --help` for each.",
    )
    parser.add_argument("--version", action="version", version=f"longside {longside.__version__}")
    parser.add_argument("command", nargs="?", help="one of the commands below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    if ns.command is None:
        parser.print_help()
        return 0
    rest = argv[1:]
    try:
        if ns.command == "bench":
            if not rest or rest[0] not in _BENCHES:
                print("usage: longside bench {" + ",".join(_BENCHES) + "} [--quick] [--json PATH]",
                      file=sys.stderr)
                return 2
            return _run(_BENCHES[rest[0]][0], rest[1:])
        if ns.command not in _COMMANDS:
            parser.error(f"unknown command {ns.command!r}")
        return _run(_COMMANDS[ns.command][0], rest)
    except LongsideError as e:
        print(f"longside: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the command was given cannot be read or written
        print(f"longside: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
