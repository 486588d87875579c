"""Remember a text, ask about it in a chat, keep the memory for next time.

    python examples/remember_and_ask.py notes.txt "What did the notes say about Tuesday?"

Without arguments it memorizes a short made-up note and asks about it. Public API only.
"""

import sys
from pathlib import Path

from longside import ChatSession, load_model

NOTE = ("Meeting notes, 3 March. The budget review moved from Monday to Tuesday at 10:30. "
        "Priya will bring the printed figures; the projector in room 4 is broken, so we meet in room 7. ")


def main(argv: list[str]) -> int:
    source, question = (argv + [None, None])[:2]
    model, info = load_model()
    print(f"[{info['note']}]")
    chat = ChatSession(model, system="Answer briefly.", max_new_tokens=40)
    n = chat.memorize(source if source else NOTE * 40)  # a few thousand tokens, far beyond one window
    print(f"memorized {n:,} tokens; the local window holds {model.config.window}")
    for piece in chat.stream(question or "Which room is the budget review in, and when?"):
        print(piece, end="", flush=True)
    print()
    out = Path("remember_and_ask.session")
    chat.save(out)  # transcript + memory, atomic and checksummed; ChatSession.load(out, model) resumes
    print(f"saved to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
