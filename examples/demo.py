"""The long-memory demo (`make demo`): read the first chapters of a held-out Austen novel
into memory, then ask about a detail ~15k tokens back, far outside the 1024-token window.

The bare backbone sees only the prompt; longside sees the prompt plus what it reads from
memory (the shipped checkpoint: side network and token cache). Both outputs are printed
side by side with what the book says. Uses the public API only (`longside`, plus
`longside.data` for the prepared book).
"""

import sys
import textwrap
import time

import torch

from longside import generate, load_model
from longside.data import load_books

BOOK, CHAPTERS = "Persuasion", 5
PROBES = [  # (how to ask, prompt, key words of the true answer, what the book says)
    ("continue", 'This was the page at which the favourite volume always opened:\n\n'
                 '"ELLIOT OF KELLYNCH HALL.\n\n"Walter Elliot, born March 1, 1760, married, July 15, 1784, '
                 'Elizabeth, daughter of James Stevenson, Esq. of',
     "South Park", "...of South Park, in the county of Gloucester, by which lady (who died 1800) he has issue..."),
    ("chat", "In Sir Walter Elliot's family record, whom did his daughter Mary marry on December 16, 1810?",
     "Musgrove", '"Married, December 16, 1810, Charles, son and heir of Charles Musgrove, Esq. of Uppercross"'),
]


def bare_backbone(model, prompt: str, chat: bool, n: int) -> str:
    """The frozen backbone alone, through transformers' generate: it sees only the prompt."""
    tok, hf = model.backbone.tokenizer, model.backbone.model
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def side_by_side(left: str, right: str, width: int = 44) -> str:
    a = textwrap.wrap(" ".join(left.split()), width) or [""]
    b = textwrap.wrap(" ".join(right.split()), width) or [""]
    rows = [f"  {x:<{width}} | {y}" for x, y in zip(a + [""] * (len(b) - len(a)), b + [""] * (len(a) - len(b)))]
    return "\n".join([f"  {'bare backbone (prompt only)':<{width}} | longside (prompt + memory)",
                      f"  {'-' * width} | {'-' * width}"] + rows)


def main() -> int:
    t0 = time.time()
    model, info = load_model()  # the GGUF's own 4-bit blocks
    note = info["note"]
    print(f"model: {note}")
    book = next(b for b in load_books("test") if b["title"] == BOOK)
    text = "\n\n".join(ch["text"] for ch in book["chapters"][:CHAPTERS])
    print(f"memorizing chapters 1-{CHAPTERS} of {BOOK} (held out from training) ...", flush=True)
    n = model.memorize(text)
    print(f"memory: {n:,} tokens ({len(model.memory.banks[0]):,} stored); the local window is "
          f"{model.config.window} tokens, so everything below is far outside it\n")
    for kind, prompt, key, truth in PROBES:
        chat = kind == "chat"
        print(f"== {'question' if chat else 'continue the text'}: {prompt!r}")
        bare = bare_backbone(model, prompt, chat, 40)
        ours = generate(model, prompt, 40, chat=chat, write_memory=False)
        print(side_by_side(bare, ours))
        print(f"  the book: {truth}")
        print(f"  contains {key!r}: bare backbone {'yes' if key in bare else 'no'}, "
              f"longside {'yes' if key in ours else 'no'}\n")
    if "UNTRAINED" in note:
        print("note: the side network is untrained, so longside's output is the backbone's; the memory\n"
              "      was searched on every token, but an untrained reader adds zero to the output.")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
