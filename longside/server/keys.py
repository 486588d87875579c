"""API keys for `longside serve`: a JSON file of user names and the SHA-256 of each key.

Keys themselves are never stored; `add` returns a new key once and only its hash is kept.
Each change re-reads the file and rewrites it atomically, so two processes adding users
lose nothing unless their changes interleave between one's read and its rename (a window
of milliseconds; run `longside keys` one at a time to be sure).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

from longside.errors import LongsideError
from longside.paths import write_json

FORMAT = "longside-keys"
VERSION = 1
KEY_PREFIX = "ls-"
# Names become each user's memory directory: no '/', no leading '.' or '-', nothing to quote.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyFile:
    """The users and key hashes in one keys file. A missing file means no users yet."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int, int] | None = None
        self._users: dict[str, dict[str, str]] = {}
        self._refresh()  # a broken file is reported now, not at the first request

    def add(self, name: str, *, replace: bool = False) -> str:
        """Make a new key for `name` and return it; it cannot be shown again. With
        `replace`, an existing user's key is rotated (the old key stops working)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise LongsideError(f"invalid user name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                                "starting with a letter or digit")
        users = self._read()
        if name in users and not replace:
            raise LongsideError(f"user {name!r} already has a key in {self.path}; pass --replace to "
                                "rotate it (the old key stops working)")
        # Each name is a directory on disk, and some file systems ignore case.
        clash = [u for u in users if u.lower() == name.lower() and u != name]
        if clash:
            raise LongsideError(f"user name {name!r} differs from existing user {clash[0]!r} only in case; "
                                "choose another name")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        # the id names the user's memory on the server: a rotated key keeps it, while a
        # name removed and added again is a new user who never sees the old one's memory
        uid = users[name].get("id") if name in users else None
        users[name] = {"sha256": _hash(key), "created": created, "id": uid or secrets.token_hex(6)}
        self._write(users)
        return key

    def remove(self, name: str) -> None:
        """Delete `name` and its key (LongsideError if there is no such user)."""
        users = self._read()
        if name not in users:
            raise LongsideError(f"no user {name!r} in {self.path} (`longside keys list` shows the users)")
        del users[name]
        self._write(users)

    def store_name(self, name: str) -> str:
        """Where the server keeps `name`'s memory: the name and the user's id."""
        uid = self._refresh()[name].get("id")
        return f"{name}+{uid}" if isinstance(uid, str) and uid.isalnum() else name

    def names(self) -> list[str]:
        """The user names, sorted."""
        return sorted(self._refresh())

    def user_for(self, key: str | None) -> str | None:
        """The user whose key this is, or None. Every hash is compared, in constant time,
        so timing tells nothing about which user or how close a guess was."""
        if not isinstance(key, str) or not key:
            return None
        digest = _hash(key)
        found = None
        for name, entry in self._refresh().items():
            if hmac.compare_digest(digest, entry["sha256"]):
                found = name
        return found

    def _refresh(self) -> dict[str, dict[str, str]]:
        # Re-read only when the file changed (each write renames a new file into place),
        # so a running server sees added, rotated and removed keys without a restart.
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._users = None, {}
            return self._users
        stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        if stamp != self._stamp:
            self._users = self._read()
            self._stamp = stamp
        return self._users

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        fix = "repair it, or move it aside and add the users again with `longside keys add` (nothing was changed)"
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LongsideError(f"keys file {self.path} is not valid JSON ({e}); {fix}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LongsideError(f"{self.path} is not a longside keys file; {fix}")
        if data.get("version") != VERSION:
            raise LongsideError(f"keys file {self.path} has version {data.get('version')!r}; this longside "
                                f"reads version {VERSION}; upgrade longside or {fix}")
        users = data.get("users")
        if not isinstance(users, dict) or not all(
                isinstance(n, str) and _NAME.fullmatch(n) and isinstance(u, dict)
                and isinstance(u.get("sha256"), str) and _HEX64.fullmatch(u["sha256"])
                for n, u in users.items()):
            raise LongsideError(f"keys file {self.path} has a malformed 'users' entry; {fix}")
        return users

    def _write(self, users: dict[str, dict[str, str]]) -> None:
        write_json({"format": FORMAT, "version": VERSION, "users": dict(sorted(users.items()))}, self.path)
        # mkstemp already made it private; say so explicitly rather than rely on that.
        os.chmod(self.path, 0o600)
