"""`longside data prepare|stats`: build the corpora in the cache, and report on them."""

from __future__ import annotations

import argparse
import json
import sys

from longside.data.prepare import prepare
from longside.data.sources import SOURCES
from longside.data.stats import stats
from longside.paths import atomic_file, check_output_file


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="longside data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download and parse the sources (skips what is already prepared)")
    p.add_argument("--sources", nargs="+", choices=list(SOURCES), help="only these sources (default: all)")
    p.add_argument("--force", action="store_true", help="download and rebuild even if prepared")
    p.add_argument("--strict", action="store_true", help="exit 1 when any source is missing")
    s = sub.add_parser("stats", help="books, chapters and tokens per source; classes per ICL task")
    s.add_argument("--json", metavar="PATH", help="also write the statistics to PATH as JSON")
    args = parser.parse_args(argv)

    if args.command == "prepare":
        report = prepare(args.sources, force=args.force)
        for line in report["works"]:
            print("ready:", line)
        print("data in", report["data_dir"])
        return 1 if args.strict and report["missing"] else 0

    check_output_file(args.json, "--json")
    result = stats()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(text + "\n")
    return 1 if result["books"] is None else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
