"""`longside generate`: prompt in, text out (streamed), optionally after memorizing files.

    longside generate --memorize book.txt --prompt "Who is Mr. Darcy?" --chat
    longside generate --backbone-only --prompt "Once upon a time"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from longside.backbone import load_backbone
from longside.config import parse_blocks
from longside.errors import LongsideError
from longside.inference.generate import stream
from longside.loading import load_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longside generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", "-p", help="the prompt (default: read standard input)")
    p.add_argument("--memorize", "-m", action="append", default=[], metavar="FILE",
                   help="read FILE into memory first (repeatable)")
    p.add_argument("--model", metavar="DIR", help="side-network checkpoint (default: the shipped one)")
    p.add_argument("--backbone-only", action="store_true",
                   help="generate with the bare backbone (transformers), no side network or memory")
    p.add_argument("--backbone", default="smollm2-135m", help="backbone when no checkpoint is used")
    p.add_argument("--quantize", choices=["native", "fp32", "nf4"],
                   help="backbone weights: a GGUF's own 4-bit blocks (native, the default for GGUF), "
                        "its fp32 copy, or NF4")
    p.add_argument("--backbone-memory", metavar="BLOCKS",
                   help="backbone blocks that read memory themselves, e.g. 15-29 (training-free)")
    p.add_argument("--window-carry", type=int, metavar="TOKENS",
                   help="carry the last TOKENS of each segment into the next one's window (no segment starts cold; "
                        "default: the checkpoint's setting, 256 for the shipped one; 0 switches it off)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the backbone's chat template")
    p.add_argument("--system", help="system prompt (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise LongsideError("empty prompt: pass --prompt TEXT or pipe text on standard input")
    if args.max_new_tokens < 1:
        raise LongsideError("--max-new-tokens must be at least 1")
    for f in args.memorize:
        if not Path(f).is_file():
            raise LongsideError(f"--memorize {f}: no such file")
    if args.backbone_only:
        if args.memorize or args.model or args.backbone_memory or args.window_carry is not None:
            raise LongsideError("--backbone-only runs the bare backbone: it has no memory and no side network; "
                                "drop --memorize/--model/--backbone-memory/--window-carry or --backbone-only")
        return _backbone_only(args, prompt)

    model, info = load_model(args.model, quantize=args.quantize, backbone=args.backbone)
    note = info["note"]
    if args.backbone_memory:
        model.use_backbone_memory(parse_blocks(args.backbone_memory))
        note += f", backbone memory in blocks {args.backbone_memory}"
    if args.window_carry is not None:
        model.use_window_carry(args.window_carry)
        note += f", {args.window_carry} tokens carried into each next window"
    print(f"[{note}]", file=sys.stderr)
    if args.memorize:
        n = model.memorize([Path(f) for f in args.memorize])
        print(f"[memorized {n} tokens from {len(args.memorize)} file(s)]", file=sys.stderr)
    for piece in stream(model, prompt, args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              stop=args.stop, seed=args.seed, chat=args.chat, system=args.system):
        print(piece, end="", flush=True)
    print()
    return 0


def _backbone_only(args, prompt: str) -> int:
    """The bare backbone through transformers' own `generate`, as a baseline."""
    bb = load_backbone(args.backbone, quantize=args.quantize)
    tok = bb.tokenizer
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tok.apply_chat_template(msgs + [{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    if ids.shape[1] + args.max_new_tokens > bb.spec.max_positions:
        raise LongsideError(f"prompt of {ids.shape[1]} tokens plus {args.max_new_tokens} new ones "
                            f"exceeds the backbone's {bb.spec.max_positions} positions; shorten it")
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    gen = dict(max_new_tokens=args.max_new_tokens, streamer=streamer, pad_token_id=tok.eos_token_id,
               do_sample=args.do_sample, repetition_penalty=args.repetition_penalty)
    if args.stop:
        gen.update(stop_strings=args.stop, tokenizer=tok)
    if args.do_sample:
        torch.manual_seed(args.seed)
        gen.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None)
    with torch.no_grad():
        bb.model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    return 0
