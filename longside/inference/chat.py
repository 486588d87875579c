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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from longside.backbone import plain_text, tokenize
from longside.errors import LongsideError, MemoryBankError, SessionError
from longside.inference.generate import decode_loop, eos_ids
from longside.inference.ragged import read_prompt
from longside.inference.sampling import GenerationConfig, TextPieces, make_generator
from longside.inference.window import LocalWindow
from longside.memory import MAIN_FILE, Memory, block_file, is_bank_file
from longside.memory_bank import MemoryBank
from longside.paths import atomic_dir, recover

if TYPE_CHECKING:
    from longside.model import LongSideModel

FORMAT = "longside-chat-session"
VERSION = 1
_MANIFEST, _MEMORY = "session.json", MAIN_FILE


class ChatSession:
    """A chat with `model` (batch size 1, memory row 0).

    `send(message) -> reply`, `stream(message)` yields reply pieces; `memorize(source)`,
    `clear()`, `stats()`, `save(path)`, `ChatSession.load(path, model)`. Decoding options
    are the fields of `GenerationConfig` (greedy by default; `max_new_tokens` 256 here),
    given one by one or as `config`; a session always uses the chat template and memory.
    """

    def __init__(self, model: "LongSideModel", system: str | None = None, *,
                 config: GenerationConfig | None = None, memory: Memory | None = None, **options):
        self.model, self.system = model, system
        options.setdefault("max_new_tokens", 256 if config is None else config.max_new_tokens)
        self.config = (config or GenerationConfig()).updated(**options)
        self._gen = make_generator(self.config.seed)
        # a memory of its own (one row; e.g. a server's user), or row 0 of the model's
        self._memory = memory
        if memory is None:
            model.memory_for(1)
        elif memory.rows != 1:
            raise LongsideError(f"a chat session's memory has one row, got {memory.rows}")
        self.meta: dict = {}  # what an application keeps with the session (saved with it, as JSON)
        self._new_conversation()

    @property
    def memory(self) -> Memory:
        return self._memory if self._memory is not None else self.model.memory

    def _new_conversation(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.window = LocalWindow(self.model, 1, memory=self._memory)
        self._fed = ""  # the chat-template text whose tokens have been read (window + memory)
        self._turn = ""  # the chat-template text of the last turn's prompt

    # -- talking -------------------------------------------------------------------------
    def send(self, message: str) -> str:
        """The model's reply to `message` (the turn is kept in the conversation)."""
        return "".join(self.stream(message))

    def stream(self, message: str) -> Iterator[str]:
        """Yield the reply to `message` in pieces as it is generated."""
        if not isinstance(message, str) or not message.strip():
            raise LongsideError("empty message: type something to send")
        ids = self.begin(self.messages + [{"role": "user", "content": message}])
        pieces = TextPieces(self.model.backbone.tokenizer, [])
        chosen: list[int] = []
        try:
            # on the batch's path, as `longside serve` reads a prompt: the same reply there
            self.window, logits = read_prompt(self.window, ids)
            for t, texts in decode_loop(self.window, ids, self.config,
                                        eos_ids(self.model, self.config.eos_token_id), self._gen, [pieces],
                                        logits=logits):
                chosen.append(int(t[0]))
                if texts[0]:
                    yield texts[0]
            tail = pieces.finish()
            if tail:
                yield tail
        finally:  # also when the caller stops early: keep what was said
            self.end(chosen, pieces.text)

    def begin(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """Start a turn whose conversation is `messages` (ending with the user's) -> the token
        ids `[1, T]` to feed the window now: only what was not read before. Then the
        caller decodes (`stream` does, or a server's batch) and calls `end`."""
        tok = self.model.backbone.tokenizer
        self.messages = list(messages)
        # messages are text: special-token strings in them can never forge a role or turn
        shown = [{**m, "content": plain_text(tok, m["content"])} for m in self.messages]
        full = tok.apply_chat_template(shown, add_generation_prompt=True, tokenize=False)
        # feed only what is new since the last turn. A template that rewrites earlier text
        # (e.g. trims a reply) breaks the prefix; what was read stays read, so feed from
        # where the texts part
        same = len(os.path.commonprefix([full, self._fed]))
        if self._fed and (not full[same:] or (self._turn and not full.startswith(self._turn))):
            # another conversation (or the same turn again): what the window holds moves
            # into memory, and the new conversation starts a window of its own
            self.window.flush()
            same = 0
        self._turn = full
        return torch.tensor([tokenize(tok, full[same:])])

    def end(self, chosen: list[int], reply: str) -> None:
        """Finish the turn `begin` started: `chosen` token ids were decoded (every one but
        the last read into the window), `reply` is their text."""
        self.messages.append({"role": "assistant", "content": reply})
        self._fed = self._turn + self.model.backbone.tokenizer.decode(chosen[:-1], skip_special_tokens=False)

    # -- memory --------------------------------------------------------------------------
    def memorize(self, source, progress: bool = True) -> int:
        """Read text, a file or an iterable of those into this session's memory; returns tokens."""
        return self.memory.memorize(source, rows=[0], progress=progress)

    def clear(self) -> None:
        """Forget the conversation and everything in memory (the system prompt stays)."""
        self.memory.reset()
        self._new_conversation()

    def stats(self) -> dict:
        """Turns, tokens in the local window and in memory, and the memory bank's stats."""
        bank = self.memory.banks[0]
        return {"turns": sum(m["role"] == "user" for m in self.messages), "window_tokens": self.window.n,
                "window": self.window.window, "segments_moved_to_memory": self.window.segments_written,
                "memory_tokens": len(bank), "memory": bank.stats()}

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, memory_unchanged: bool = False) -> None:
        """Write transcript, local window and memory to the directory `path`, atomically:
        a failure leaves any previous session at `path` as it was. `memory_unchanged`: the
        caller knows memory was not written since the last save to `path`, whose memory
        file is then kept (linked, not rewritten; a server saves after every turn)."""
        model = self.model
        path = Path(path)
        if path.is_symlink() and path.resolve().is_dir():
            path = path.resolve()  # a link to a session: save into the session it points to
        with atomic_dir(path, marker=_MANIFEST) as tmp:
            _keep_foreign_files(Path(path), tmp)
            memory = self.memory
            files = _previous_memory(path, tmp) if memory_unchanged and memory.blocks is None else None
            files = files or memory.write_files(tmp, 0)
            # with backbone memory, each block's bank too
            blocks = {str(L): files[block_file(L)] for L in (memory.blocks.layers if memory.blocks else ())}
            body = {
                "format": FORMAT, "version": VERSION,
                "owner": model.backbone.owner_id(model.config.memory_layer),
                "window": model.config.window, "side_config": _side_identity(model, memory),
                "system": self.system, "messages": self.messages, "fed": self._fed,
                "window_ids": self.window.ids[0].tolist(), "segments_written": self.window.segments_written,
                "window_carried": self.window.carried,
                "max_new_tokens": self.config.max_new_tokens,
                "sampling": {k: getattr(self.config, k) for k in GenerationConfig.SAMPLING},
                "memory_sha256": files[MAIN_FILE],
                "backbone_memory_sha256": blocks,
            }
            if self.meta:  # absent otherwise, so sessions saved before it still match
                body["meta"] = self.meta
            if self._turn:
                body["turn"] = self._turn
            (tmp / _MANIFEST).write_text(json.dumps({"sha256": _sha256_json(body), "body": body}, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike, model: "LongSideModel", seed: int | None = None, *,
             own_memory: bool = False) -> "ChatSession":
        """Resume a session saved with `save`. Raises SessionError if it is corrupt, from
        another format version, or made with another backbone or side network; the model's
        memory is left untouched then. `own_memory`: the session gets a memory of its own
        instead of replacing the model's."""
        return cls.resume(cls.read(path, model), model, seed, own_memory=own_memory)

    @staticmethod
    def read(path: str | os.PathLike, model: "LongSideModel") -> "SavedSession":
        """The files of a saved session, read and checked (the first half of `load`; runs
        no model, and installs nothing: a failure leaves everything as it was)."""
        path = Path(path)
        recover(path)
        body = _read_manifest(path)
        if body["owner"] != model.backbone.owner_id(model.config.memory_layer):
            raise SessionError(f"session {path} was made with {body['owner']!r}, this model is "
                               f"{model.backbone.owner_id(model.config.memory_layer)!r}; load it with that model")
        saved = {k: v for k, v in body["side_config"].items() if k != "window_carry"}  # sessions of session 33
        reader = model.new_memory(1)  # its own: nothing shared is touched
        if body["window"] != model.config.window or saved != _side_identity(model, reader):
            raise SessionError(f"session {path} was made with another side network configuration; "
                               "load it with the model that saved it")
        blocks = body.get("backbone_memory_sha256", {})
        for name in [_MEMORY] + [block_file(int(L)) for L in blocks]:
            if not (path / name).is_file():
                raise SessionError(f"{path / name} is missing: the session directory is incomplete")
        config = _check_body(body, model, path)
        try:
            bank, block_banks = reader.read_files(path / _MEMORY, path, [int(L) for L in blocks])
        except MemoryBankError as e:
            raise SessionError(f"session {path}: {e} (the memory does not match its checksum or cannot be "
                               "read; the session cannot be resumed)") from None
        # each file read once: the banks carry their files' checksums
        for name, have, want in [(_MEMORY, bank.file_sha256, body["memory_sha256"])] + [
                (block_file(int(L)), block_banks[int(L)].file_sha256, digest) for L, digest in blocks.items()]:
            if have != want:
                raise SessionError(f"session {path}: {name} does not match its checksum (corrupt or replaced); "
                                   "the session cannot be resumed")
        return SavedSession(body, config, bank, block_banks)

    @classmethod
    def resume(cls, saved: "SavedSession", model: "LongSideModel", seed: int | None = None, *,
               own_memory: bool = False) -> "ChatSession":
        """The session `read` returned, installed (the second half of `load`): the local
        window is rebuilt by reading its tokens again."""
        body = saved.body
        # everything was read and checked: only now does the session's memory replace the model's
        memory = model.new_memory(1) if own_memory else model.init_memory(1)
        memory.put_row(0, saved.bank, saved.block_banks)
        session = cls(model, body["system"], config=saved.config.updated(seed=seed),
                      memory=memory if own_memory else None)
        session.messages, session._fed = body["messages"], body["fed"]
        session.meta, session._turn = body.get("meta", {}), body.get("turn", "")
        session.window = LocalWindow(model, 1, memory=session._memory)
        if body["window_ids"]:  # rebuild the local caches by reading the window again
            session.window.feed(torch.tensor([body["window_ids"]]))
        session.window.segments_written = body["segments_written"]
        session.window.carried = body.get("window_carried", 0)  # already in memory: not written again
        return session


@dataclass
class SavedSession:
    """A saved session's checked contents (`ChatSession.read`), not yet installed."""

    body: dict
    config: GenerationConfig
    bank: MemoryBank
    block_banks: dict


def saved_memory_sha256(path: str | os.PathLike) -> str | None:
    """The checksum of the memory file of the session saved at `path` (None: none saved)."""
    try:
        return _read_manifest(Path(path))["memory_sha256"]
    except (SessionError, KeyError):
        return None


def _previous_memory(old: Path, new: Path) -> dict[str, str] | None:
    """Link the memory file of the session saved at `old` into `new` -> {file: sha256}
    as its manifest recorded it, or None where there is none to keep."""
    try:
        digest = _read_manifest(old)["memory_sha256"]
        os.link(old / _MEMORY, new / _MEMORY)
    except (SessionError, OSError, KeyError):
        return None
    return {MAIN_FILE: digest}


def _keep_foreign_files(old: Path, new: Path) -> None:
    """Copy what the user put in a session directory (anything a save does not write)
    into the new one, so re-saving a session never deletes it."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if entry.name == _MANIFEST or is_bank_file(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def _check_body(body: dict, model: "LongSideModel", path: Path) -> GenerationConfig:
    """Refuse a session whose transcript, window or options are not what `save` writes
    (a checksummed manifest can still be forged or written by another program); returns
    its generation options."""
    def bad(what: str) -> SessionError:
        return SessionError(f"session {path}: {what}; the session cannot be resumed")

    if body["system"] is not None and not isinstance(body["system"], str):
        raise bad("the system prompt is not text")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in msgs):
        raise bad("the transcript is not a list of {role, content} messages")
    if not isinstance(body["fed"], str):
        raise bad("the text read so far is not text")
    ids, vocab = body["window_ids"], model.backbone.spec.vocab_size
    if (not isinstance(ids, list) or len(ids) >= model.config.window
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids)):
        raise bad(f"the local window is not a list of fewer than {model.config.window} token ids below {vocab}")
    if not isinstance(body.get("meta", {}), dict):
        raise bad("its application data (meta) is not an object")
    if not isinstance(body.get("turn", ""), str):
        raise bad("the last turn's prompt is not text")
    n = body["segments_written"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise bad("segments_written is not a count")
    c = body.get("window_carried", 0)
    if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= len(ids):
        raise bad("window_carried must be a count of no more than the window's tokens")
    sampling = body["sampling"]
    if not isinstance(sampling, dict) or set(sampling) - set(GenerationConfig.SAMPLING):
        raise bad("its sampling options are not those of GenerationConfig")
    try:
        return GenerationConfig(max_new_tokens=body["max_new_tokens"], **sampling)
    except (TypeError, ValueError, LongsideError) as e:
        raise bad(f"its generation options are invalid ({e})") from None


def _side_identity(model: "LongSideModel", memory: Memory) -> dict:
    """What a saved session must match in the model that loads it; `memory`: the session's
    (saving) or one of the loading model's (its query maps are those its keys are written with)."""
    c = model.config
    ident = {"memory_layer": c.memory_layer, "chunk_size": c.chunk_size, "memory_attention": c.memory_attention}
    if c.backbone_memory_layers:  # absent otherwise, so sessions saved before it still match
        ident["backbone_memory_layers"] = c.backbone_memory_layers
        if maps := memory.blocks.maps_digest():  # keys written above a mapped block depend on its map
            ident["query_maps"] = maps
    # not window_carry: a memory written with one carry reads as well with another, and the
    # window's carried tokens (already in memory) are skipped at its next flush whatever the
    # model's carry, so a session resumes under a changed carry (a server switching it keeps
    # its users)
    return ident


def _sha256_json(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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
