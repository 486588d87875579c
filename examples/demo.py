"""The demo `make demo` runs: load the real SmolLM2 backbone and generate, streamed.

Later it becomes the long-memory demo (the generation issue); today it shows the
foundation works end to end from a fresh machine.
"""

from longside.cli import main

if __name__ == "__main__":
    question = "In two sentences, what is a long-term memory for a language model good for?"
    print(f"prompt: {question}\nSmolLM2-135M-Instruct: ", end="", flush=True)
    raise SystemExit(main(["generate", "--chat", "--max-new-tokens", "80", "--prompt", question]))
