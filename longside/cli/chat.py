"""`longside chat`: talk to a model that remembers what it read; works interactively or through a pipe.

    longside chat --memorize notes.txt --session talk.session
    printf 'Hello\\n/stats\\n/quit\\n' | longside chat

Commands inside the chat: /save [PATH], /memorize FILE, /clear, /stats, /help, /quit.
With --session PATH an existing session is resumed, and the session is saved there on
/save and on exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longside.errors import LongsideError
from longside.inference.chat import ChatSession
from longside.loading import load_model

HELP = """commands:
  /save [PATH]     save transcript + memory (to --session PATH by default)
  /memorize FILE   read a text file into memory
  /clear           forget the conversation and the memory
  /stats           window and memory sizes (JSON)
  /help            this text
  /quit            leave (saves to --session PATH if given)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longside chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memorize", "-m", action="append", default=[], metavar="FILE",
                   help="read FILE into memory before the chat starts (repeatable)")
    p.add_argument("--session", metavar="PATH", help="resume from / save to this session directory")
    p.add_argument("--model", metavar="DIR", help="side-network checkpoint (default: the shipped one)")
    p.add_argument("--quantize", choices=["native", "fp32", "nf4"],
                   help="backbone weights: a GGUF's own 4-bit blocks (native, the default for GGUF), "
                        "its fp32 copy, or NF4")
    p.add_argument("--system", help="system prompt of a new session")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    # a line of bytes that are not UTF-8 is read with replacement characters, not a crash
    sys.stdin.reconfigure(errors="replace")
    interactive = sys.stdin.isatty()
    model, info = load_model(args.model, quantize=args.quantize)
    note = info["note"]
    _info(f"[{note}]")
    session_path = Path(args.session) if args.session else None
    if session_path is not None and session_path.is_symlink() and session_path.resolve().is_dir():
        session_path = session_path.resolve()  # save where it was loaded from, through the link
    if session_path is not None and session_path.exists() and not session_path.is_dir():
        raise LongsideError(f"--session {session_path} is a file, not a session directory")
    if session_path is not None and session_path.exists():
        chat = ChatSession.load(session_path, model, seed=args.seed)
        chat.config = chat.config.updated(max_new_tokens=args.max_new_tokens)
        _info(f"[resumed {session_path}: {chat.stats()['turns']} turns, {chat.stats()['memory_tokens']} tokens in memory]")
    else:
        chat = ChatSession(model, system=args.system, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                           temperature=args.temperature, top_p=args.top_p,
                           repetition_penalty=args.repetition_penalty, seed=args.seed)
    for f in args.memorize:
        _memorize(chat, f)
    if interactive:
        _info("type a message, or /help")
    try:
        _talk(chat, session_path, interactive)
    finally:  # whatever ended the chat, the conversation is saved
        if session_path is not None:
            try:
                chat.save(session_path)
                _info(f"[saved {session_path}]")
            except (LongsideError, OSError) as e:
                _info(f"longside: error: the session could not be saved to {session_path}: {e}; "
                      "the conversation of this run is lost unless an earlier /save kept it")
    return 0


def _talk(chat, session_path: Path | None, interactive: bool) -> None:
    """Read messages and /commands from standard input until it ends or /quit."""
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(chat, line, session_path):
                break
            continue
        try:
            for piece in chat.stream(line):
                print(piece, end="", flush=True)
            print(flush=True)
        except KeyboardInterrupt:  # stop this reply, keep the chat
            print(flush=True)
        except LongsideError as e:
            _info(f"longside: error: {e}")


def _command(chat, line: str, session_path: Path | None) -> bool:
    """Run a /command; False means quit. Errors are reported and the chat goes on."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            print(HELP, flush=True)
        elif cmd == "/save":
            target = Path(arg) if arg else session_path
            if target is None:
                raise LongsideError("/save needs a path (or start with --session PATH)")
            chat.save(target)
            _info(f"[saved {target}]")
        elif cmd == "/memorize":
            if not arg:
                raise LongsideError("/memorize needs a file: /memorize FILE")
            _memorize(chat, arg)
        elif cmd == "/clear":
            chat.clear()
            _info("[conversation and memory cleared]")
        elif cmd == "/stats":
            print(json.dumps(chat.stats()), flush=True)
        else:
            raise LongsideError(f"unknown command {cmd}; /help lists them")
    except (LongsideError, OSError) as e:  # e.g. /save to a place that cannot be written
        _info(f"longside: error: {e}")
    return True


def _memorize(chat, file: str) -> None:
    if not Path(file).is_file():
        raise LongsideError(f"no file {file} to memorize")
    n = chat.memorize(Path(file))
    _info(f"[memorized {n} tokens from {file}; {chat.stats()['memory_tokens']} tokens in memory]")


def _info(msg: str) -> None:
    """Status lines go to stderr, so stdout carries only the conversation (pipe-friendly)."""
    print(msg, file=sys.stderr, flush=True)
