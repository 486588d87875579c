"""`UserStore`: every user's conversation and long-term memory, on disk and, while used, in RAM.

A user is a `ChatSession` with a memory of its own, saved as a chat-session directory
(`ChatSession.save`: checksummed manifest and memory bank, replaced atomically) under
`ROOT/users/NAME`. The server saves a user after every turn, document and forget, so a
restart, or a kill -9 at any moment, finds each user as of their last completed
request: a save in flight is lost whole, never half-written (`paths.atomic_dir`).

Users not in use leave RAM, least recently used first, once the resident total passes
`max_resident_bytes`; their next request loads them back from disk.

Why these files and not SQLite for the metadata: a user's state is one manifest of a few
KB written together with a multi-MB bank, always whole; the directory rename makes the
pair atomic without a second store to keep in step, and nothing queries across users.
"""

from __future__ import annotations

import datetime
import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from longside.errors import LongsideError, SessionError
from longside.inference.chat import ChatSession, SavedSession, saved_memory_sha256
from longside.memory import MAIN_FILE
from longside.paths import recover

if TYPE_CHECKING:
    from longside.model import LongSideModel

# a key file's user name, then "+" and the user's id (keys.KeyFile.store_name)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(\+[0-9a-f]{1,32})?")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def resident_bytes(session: ChatSession) -> int:
    """RAM a user holds: the memory bank and the local window's caches."""
    win = session.window
    total = session.memory.banks[0].nbytes()
    for layer in getattr(win.cache, "layers", ()):
        total += layer.keys.nbytes + layer.values.nbytes if getattr(layer, "keys", None) is not None else 0
    for k, v in win.side_caches or ():
        total += k.nbytes + v.nbytes
    for t in (win.keys, win.values, win.token_keys):
        total += t.nbytes if t is not None else 0
    return total


class UserStore:
    """Users' sessions under `root` (see the module docstring). Not thread-safe: the
    server's engine thread alone calls it."""

    def __init__(self, model: "LongSideModel", root: str | Path, max_resident_bytes: int = 4 << 30):
        self.model, self.root = model, Path(root)
        self.max_resident_bytes = max_resident_bytes
        self._resident: OrderedDict[str, ChatSession] = OrderedDict()
        (self.root / "users").mkdir(parents=True, exist_ok=True)

    def path(self, user: str) -> Path:
        if not isinstance(user, str) or not _NAME.fullmatch(user):
            raise LongsideError(f"invalid user name {user!r}")
        return self.root / "users" / user

    def resident(self) -> list[str]:
        """Users in RAM, least recently used first."""
        return list(self._resident)

    def read(self, user: str) -> SavedSession:
        """Read and check the user's saved files (no model work)."""
        try:
            return ChatSession.read(self.path(user), self.model)
        except SessionError as e:
            raise LongsideError(f"the stored memory of user {user!r} cannot be read ({e}); it was left as "
                                "it is for an administrator to inspect (forgetting moves it aside)") from None

    def session(self, user: str, saved: SavedSession | Exception | None = None) -> ChatSession:
        """The user's session: in RAM, else read from disk, else a new one. `saved`: what
        `read(user)` returned (or raised) just before, e.g. on another thread, so it is
        not read twice."""
        if user in self._resident:
            self._resident.move_to_end(user)
            return self._resident[user]
        if isinstance(saved, Exception):
            raise saved
        path = self.path(user)
        recover(path)
        if saved is not None or path.exists():
            session = ChatSession.resume(saved or self.read(user), self.model, own_memory=True)
        else:
            # decoding options come with each request (the engine), not from the session
            session = ChatSession(self.model, memory=self.model.new_memory(1))
            session.meta = {"documents": [], "created": now()}
        self._resident[user] = session
        return session

    def on_disk_only(self, user: str) -> bool:
        """Whether the user's session is stored but not in RAM (its next use reads it)."""
        return user not in self._resident and self.path(user).exists()

    def save(self, user: str, *, memory_unchanged: bool = False) -> None:
        """Write the user's session to disk (atomically; see ChatSession.save). If that
        fails the user leaves RAM: what is in RAM and on disk never disagree unseen."""
        try:
            self._resident[user].save(self.path(user), memory_unchanged=memory_unchanged)
        except BaseException:
            self.unload(user)
            raise

    def info(self, user: str) -> dict:
        """What the user's memory holds: tokens, documents, bytes, turns, the stored file's checksum."""
        s = self.session(user)
        bank = s.memory.banks[0]
        digest = saved_memory_sha256(self.path(user))
        return {"user": user.split("+")[0], "tokens": len(bank), "window_tokens": s.window.n,
                "documents": list(s.meta.get("documents", [])), "bytes": bank.nbytes(),
                "turns": sum(m["role"] == "user" for m in s.messages), "sha256": digest,
                "file": MAIN_FILE}

    def forget(self, user: str) -> None:
        """Clear the user's memory and conversation, and save that. A stored memory that
        cannot be read is moved aside (kept, `NAME.unreadable-TIME`), not deleted."""
        try:
            s = self.session(user)
        except LongsideError:
            path = self.path(user)
            path.rename(path.with_name(f"{path.name}.unreadable-{now().replace(':', '')}"))
            s = self.session(user)
        s.clear()
        s.meta = {"documents": [], "created": s.meta.get("created", now()), "forgotten": now()}
        self.save(user)

    def unload(self, user: str) -> None:
        """Drop the user from RAM without saving (the next request reads the last save)."""
        self._resident.pop(user, None)

    def evict(self, busy: set[str]) -> list[str]:
        """Drop users not in `busy` from RAM, least recently used first, until the
        resident total fits `max_resident_bytes` -> the users dropped (already saved)."""
        sizes = {u: resident_bytes(s) for u, s in self._resident.items()}
        total, dropped = sum(sizes.values()), []
        for user in list(self._resident):
            if total <= self.max_resident_bytes:
                break
            if user in busy:
                continue
            del self._resident[user]
            total -= sizes[user]
            dropped.append(user)
        return dropped
