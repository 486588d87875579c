"""`longside generate`: prompt in, text out, streamed token by token."""

from __future__ import annotations

import argparse
import sys

from longside.errors import LongsideError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longside generate", description=__doc__)
    p.add_argument("--prompt", "-p", help="the prompt (default: read standard input)")
    p.add_argument("--backbone", default="smollm2-135m",
                   help="short name, Hugging Face directory or .gguf file (default: smollm2-135m)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the backbone's chat template (instruct models)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise LongsideError("empty prompt: pass --prompt TEXT or pipe text on standard input")
    if args.max_new_tokens < 1:
        raise LongsideError("--max-new-tokens must be at least 1")
    import torch
    from transformers import TextStreamer

    from longside.backbone import load_backbone

    bb = load_backbone(args.backbone)
    tok = bb.tokenizer
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    if ids.shape[1] + args.max_new_tokens > bb.spec.max_positions:
        raise LongsideError(f"prompt of {ids.shape[1]} tokens plus {args.max_new_tokens} new ones "
                            f"exceeds the backbone's {bb.spec.max_positions} positions; shorten it")
    torch.manual_seed(args.seed)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    gen = dict(max_new_tokens=args.max_new_tokens, streamer=streamer, pad_token_id=tok.eos_token_id,
               do_sample=args.do_sample)
    if args.do_sample:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    with torch.no_grad():
        bb.model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    return 0
