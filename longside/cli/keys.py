"""`longside keys add|list|remove`: the users and API keys of `longside serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longside.paths import cache_dir
from longside.server.keys import KeyFile


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="longside keys", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="make a new key for a user and print it (shown only once)")
    a.add_argument("name", help="user name: letters, digits, '_', '.', '-' (at most 64)")
    a.add_argument("--replace", action="store_true", help="rotate the key of an existing user")
    sub.add_parser("list", help="the user names, one a line")
    r = sub.add_parser("remove", help="delete a user and its key")
    r.add_argument("name")
    for p in sub.choices.values():
        p.add_argument("--keys", metavar="FILE", type=Path,
                       help="the keys file (default: CACHE/server/keys.json)")
    args = parser.parse_args(argv)
    path = args.keys if args.keys is not None else cache_dir() / "server" / "keys.json"
    keys = KeyFile(path)

    if args.command == "add":
        key = keys.add(args.name, replace=args.replace)
        print(key)  # alone on stdout, so `KEY=$(longside keys add NAME)` works
        print(f"{'rotated' if args.replace else 'added'} the key of {args.name!r} in {path}; it is shown only "
              f"once, keep it now. Start the server with `longside serve --keys {path}`.", file=sys.stderr)
    elif args.command == "list":
        names = keys.names()
        for name in names:
            print(name)
        if not names:
            print(f"no users in {path} (add one with `longside keys add NAME`)", file=sys.stderr)
    else:
        keys.remove(args.name)
        print(f"removed {args.name!r} from {path}; its key no longer works", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
