"""`longside serve`: an OpenAI-compatible server where every user has a persistent memory.

    longside keys add alice --keys keys.json       # prints alice's key once
    longside serve --keys keys.json --store ./memories
    curl -s localhost:8000/v1/chat/completions -H "Authorization: Bearer $KEY" \\
         -H "Content-Type: application/json" \\
         -d '{"model": "longside", "messages": [{"role": "user", "content": "Hi!"}]}'

Without --keys there is one local user and the server listens on loopback only.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from pathlib import Path

import uvicorn

from longside.errors import LongsideError
from longside.loading import load_model
from longside.paths import cache_dir, check_output_dir
from longside.server.app import MAX_TOKENS_LIMIT, make_app
from longside.server.engine import Engine
from longside.server.keys import KeyFile
from longside.server.store import UserStore

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_servable(model, path: str | None) -> None:
    """Refuse a checkpoint whose settings the server cannot keep for every user."""
    if model.config.backbone_memory_layers:
        raise LongsideError(f"{path} reads backbone memory, which the server does not support yet (its "
                            "rows cannot share a batch); serve a checkpoint without backbone_memory_layers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longside serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="side-network checkpoint (default: the shipped one)")
    p.add_argument("--quantize", choices=["native", "fp32", "nf4"], help="backbone weights (default: native)")
    p.add_argument("--window-carry", type=int, metavar="TOKENS",
                   help="carry the last TOKENS of each full segment into the next window, so no segment starts "
                        "cold (default: the checkpoint's setting; users saved under another carry resume under it)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--store", metavar="DIR", help="where users' memories live (default: the longside cache)")
    p.add_argument("--keys", metavar="FILE", help="API keys (`longside keys add NAME`); without it one local user")
    p.add_argument("--max-batch", type=int, default=8, help="chat turns decoded together (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="an idle server waits this long for more requests before reading a prompt, again after "
                        "each that comes, 50 ms at most, so requests sent together read their prompts together; "
                        "a lone request waits it too (default 0: off; docs/results.md#server-s31)")
    p.add_argument("--max-resident-gb", type=float, default=4.0,
                   help="memories kept in RAM; idle users beyond it are unloaded, least recent first (default 4)")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (default 8 MB)")
    p.add_argument("--max-tokens", type=int, default=256, help="reply length when a request gives none")
    p.add_argument("--huge-pages", action="store_true",
                   help="weights and memories in 2 MB pages, as one-user decoding has them (off here: the server's "
                        "time to first token measured ~40%% longer with them, docs/results.md#server-s30)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.keys is None and args.host not in _LOOPBACK:
        raise LongsideError(f"without --keys the server has one local user and listens on loopback only, not "
                            f"{args.host}; add keys (`longside keys add NAME --keys FILE`) and pass --keys FILE")
    if not 0 <= args.port < 65536:
        raise LongsideError(f"--port must be 0..65535, got {args.port}")
    for name in ("max_batch", "max_tokens"):
        if getattr(args, name) < 1:
            raise LongsideError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_tokens > MAX_TOKENS_LIMIT:
        raise LongsideError(f"--max-tokens must be at most {MAX_TOKENS_LIMIT}")
    if not 0 <= args.batch_wait_ms <= 50:
        raise LongsideError(f"--batch-wait-ms must be from 0 to 50, got {args.batch_wait_ms}")
    if args.max_resident_gb <= 0 or args.max_body_mb <= 0:
        raise LongsideError("--max-resident-gb and --max-body-mb must be > 0")
    store_dir = check_output_dir(Path(args.store) if args.store else cache_dir() / "server" / "store", "store")
    keys = None
    if args.keys is not None:
        keys = KeyFile(args.keys)
        if not keys.names():
            raise LongsideError(f"{args.keys} holds no keys; add one with `longside keys add NAME --keys {args.keys}`")

    # bind before loading the model: a taken port is said at once, and `--port 0` is known
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise LongsideError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); choose another --port") from None
    port = sock.getsockname()[1]
    if not args.huge_pages:  # read by memory_bank/pages.py when the weights and each user's memory are allocated
        os.environ["LONGSIDE_HUGE_PAGES"] = "0"
    try:
        model, info = load_model(args.model, quantize=args.quantize)
        if args.window_carry is not None:
            model.use_window_carry(args.window_carry)
        _check_servable(model, args.model)
    except BaseException:
        sock.close()
        raise
    print(f"longside serve: {info['note']}", file=sys.stderr)
    store = UserStore(model, store_dir, max_resident_bytes=int(args.max_resident_gb * (1 << 30)))
    engine = Engine(model, store, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000)
    warm = engine.warm_up()  # the first user's request would pay this; here, before listening
    print(f"longside serve: warmed up in {warm:.1f} s", file=sys.stderr)
    model_id = f"longside-{model.backbone.name}"
    app = make_app(engine, model_id, keys, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                   default_max_tokens=args.max_tokens)
    logging.basicConfig(level=logging.WARNING)
    host = f"[{args.host}]" if ":" in args.host else args.host
    # HTTP on a thread, the model on the main thread (see Engine.start for why)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="longside-http", daemon=True)
    http.start()
    print(f"longside serve: {model_id} on http://{host}:{port} (store {store_dir}, "
          f"{'keys ' + args.keys if keys else 'one local user'})", flush=True)
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(10)
    return 0
