"""`ChatSession`: a conversation whose older turns move into long-term memory.

    chat = ChatSession(model, system="You are a helpful assistant.")
    chat.memorize("notes.txt")                    # optional: background in memory
    print(chat.send("What did the notes say about Tuesday?"))
    for piece in chat.stream("And Wednesday?"):   # streamed
        print(piece, end="", flush=True)
    chat.save("talk.session")                     # transcript + memory, atomically
    chat = ChatSession.load("talk.session", model)

The conversation is rendered with the backbone's chat template and read once, token by
token, into the model's local window (see window.py): each turn only feeds what is new.
When the window's segment fills, it moves into memory, so a long conversation keeps
every turn reachable while the window stays short. A session uses memory row 0 of its
model; run one session per model at a time.

On disk a session is one directory, written atomically (the previous save survives a
crash or error): `session.json` (format version, model identity, transcript, the local
window's token ids, checksums) and `memory.lsmb` (the memory bank, see memory_bank).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from longside.errors import LongsideError, MemoryBankError, SessionError
from longside.generate import _generator, decode_loop, eos_ids
from longside.memorize import block_file, check_token_memory, init_memory, memorize, tokenize
from longside.paths import atomic_dir, sha256_file
from longside.sampling import SamplingConfig, TextPieces
from longside.window import LocalWindow, prepare_memory

if TYPE_CHECKING:
    from longside.model import LongSideModel

FORMAT = "longside-chat-session"
VERSION = 1
_MANIFEST, _MEMORY = "session.json", "memory.lsmb"


class ChatSession:
    """A chat with `model` (batch size 1, memory row 0).

    `send(message) -> reply`, `stream(message)` yields reply pieces; `memorize(source)`,
    `clear()`, `stats()`, `save(path)`, `ChatSession.load(path, model)`. Sampling
    arguments are those of `generate` (greedy by default).
    """

    def __init__(self, model: "LongSideModel", system: str | None = None, *, max_new_tokens: int = 256,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, seed: int | None = None):
        self.model, self.system = model, system
        self.max_new_tokens = max_new_tokens
        self.sampling = SamplingConfig(do_sample, temperature, top_k, top_p, repetition_penalty)
        self._gen = _generator(seed)
        prepare_memory(model, 1)
        self._new_conversation()

    def _new_conversation(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.window = LocalWindow(self.model, 1)
        self._fed = ""  # the chat-template text whose tokens have been read (window + memory)

    # -- talking -------------------------------------------------------------------------
    def send(self, message: str) -> str:
        """The model's reply to `message` (the turn is kept in the conversation)."""
        return "".join(self.stream(message))

    def stream(self, message: str) -> Iterator[str]:
        """Yield the reply to `message` in pieces as it is generated."""
        if not isinstance(message, str) or not message.strip():
            raise LongsideError("empty message: type something to send")
        tok = self.model.backbone.tokenizer
        self.messages.append({"role": "user", "content": message})
        full = tok.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        # feed only what is new since the last turn. A template that rewrites earlier text
        # (e.g. trims a reply) breaks the prefix; what was read stays read, so feed from
        # where the texts part
        same = len(os.path.commonprefix([full, self._fed]))
        ids = torch.tensor([tokenize(tok, full[same:])])
        pieces = TextPieces(tok, [])
        chosen: list[int] = []
        try:
            for t, texts in decode_loop(self.window, ids, self.max_new_tokens, self.sampling,
                                        eos_ids(self.model), self._gen, [pieces]):
                chosen.append(int(t[0]))
                if texts[0]:
                    yield texts[0]
            tail = pieces.finish()
            if tail:
                yield tail
        finally:  # also when the caller stops early: keep what was said
            self.messages.append({"role": "assistant", "content": pieces.text})
            # every chosen token but the last has been read into the window
            self._fed = full + tok.decode(chosen[:-1], skip_special_tokens=False)

    # -- memory --------------------------------------------------------------------------
    def memorize(self, source, progress: bool = True) -> int:
        """Read text, a file or an iterable of those into this session's memory; returns tokens."""
        return memorize(self.model, source, row=0, progress=progress)

    def clear(self) -> None:
        """Forget the conversation and everything in memory (the system prompt stays)."""
        self.model.reset_memory()
        self._new_conversation()

    def stats(self) -> dict:
        """Turns, tokens in the local window and in memory, and the memory bank's stats."""
        bank = self.model.memory.banks[0]
        return {"turns": sum(m["role"] == "user" for m in self.messages), "window_tokens": self.window.n,
                "window": self.window.window, "segments_moved_to_memory": self.window.segments_written,
                "memory_tokens": len(bank), "memory": bank.stats()}

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write transcript, local window and memory to the directory `path`, atomically:
        a failure leaves any previous session at `path` as it was."""
        model = self.model
        bm = model.backbone_memory
        with atomic_dir(path, marker=_MANIFEST) as tmp:
            model.memory.banks[0].save(tmp / _MEMORY)
            blocks = {}  # with backbone memory, each block's bank too
            for L, banks in (bm.banks.items() if bm is not None else ()):
                banks[0].save(tmp / block_file(L))
                blocks[str(L)] = _sha256_file(tmp / block_file(L))
            body = {
                "format": FORMAT, "version": VERSION,
                "owner": model.backbone.owner_id(model.config.memory_layer),
                "window": model.config.window, "side_config": _side_identity(model),
                "system": self.system, "messages": self.messages, "fed": self._fed,
                "window_ids": self.window.ids[0].tolist(), "segments_written": self.window.segments_written,
                "max_new_tokens": self.max_new_tokens, "sampling": vars(self.sampling),
                "memory_sha256": _sha256_file(tmp / _MEMORY),
                "backbone_memory_sha256": blocks,
            }
            (tmp / _MANIFEST).write_text(json.dumps({"sha256": _sha256_json(body), "body": body}, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike, model: "LongSideModel", seed: int | None = None) -> "ChatSession":
        """Resume a session saved with `save`. Raises SessionError if it is corrupt, from
        another format version, or made with another backbone or side network; the model's
        memory is left untouched then."""
        from longside.memory_bank import MemoryBank

        path = Path(path)
        body = _read_manifest(path)
        if body["owner"] != model.backbone.owner_id(model.config.memory_layer):
            raise SessionError(f"session {path} was made with {body['owner']!r}, this model is "
                               f"{model.backbone.owner_id(model.config.memory_layer)!r}; load it with that model")
        if body["window"] != model.config.window or body["side_config"] != _side_identity(model):
            raise SessionError(f"session {path} was made with another side network configuration; "
                               "load it with the model that saved it")
        if _sha256_file(path / _MEMORY) != body["memory_sha256"]:
            raise SessionError(f"session {path}: {_MEMORY} does not match its checksum (corrupt or "
                               "replaced); the session cannot be resumed")
        blocks = body.get("backbone_memory_sha256", {})
        for L, digest in blocks.items():
            if _sha256_file(path / block_file(int(L))) != digest:
                raise SessionError(f"session {path}: {block_file(int(L))} does not match its checksum (corrupt "
                                   "or replaced); the session cannot be resumed")
        try:
            bank = MemoryBank.load(path / _MEMORY, expect_owner=body["owner"], device=model.backbone.device)
            check_token_memory(model, bank, path / _MEMORY)
            block_banks = {int(L): MemoryBank.load(path / block_file(int(L)), device=model.backbone.device,
                                                   expect_owner=model.backbone.owner_id(int(L)))
                           for L in blocks}
        except MemoryBankError as e:
            raise SessionError(f"session {path}: {e}") from None
        init_memory(model, 1)  # the session's memory replaces whatever the model held
        model.memory.banks[0] = bank
        for L, b in block_banks.items():
            model.backbone_memory.banks[L].banks[0] = b
        session = cls(model, body["system"], max_new_tokens=body["max_new_tokens"], seed=seed,
                      **body["sampling"])
        session.messages, session._fed = body["messages"], body["fed"]
        session.window = LocalWindow(model, 1)
        if body["window_ids"]:  # rebuild the local caches by reading the window again
            session.window.feed(torch.tensor([body["window_ids"]]))
        session.window.segments_written = body["segments_written"]
        return session


def _side_identity(model: "LongSideModel") -> dict:
    c = model.config
    ident = {"memory_layer": c.memory_layer, "chunk_size": c.chunk_size, "memory_attention": c.memory_attention}
    if c.backbone_memory_layers:  # absent otherwise, so sessions saved before it still match
        ident["backbone_memory_layers"] = c.backbone_memory_layers
    return ident


def _sha256_json(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise SessionError(f"{path} is missing: the session directory is incomplete") from None


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise SessionError(f"no chat session at {path}; save one with /save or ChatSession.save")
    try:
        raw = json.loads((path / _MANIFEST).read_text())
        body, digest = raw["body"], raw["sha256"]
        if body["format"] != FORMAT:
            raise SessionError(f"{path} is not a longside chat session (format {body['format']!r})")
        if body["version"] != VERSION:
            raise SessionError(f"{path} is a version {body['version']} session; this longside reads version "
                               f"{VERSION}: use the longside that saved it")
    except SessionError:
        raise
    except FileNotFoundError:
        raise SessionError(f"{path / _MANIFEST} is missing: not a chat session, or an incomplete copy") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SessionError(f"{path / _MANIFEST} is corrupt ({type(e).__name__}: {e}); the session cannot "
                           "be resumed") from None
    if _sha256_json(body) != digest:
        raise SessionError(f"{path / _MANIFEST} does not match its checksum (corrupt or edited); "
                           "the session cannot be resumed")
    return body
