"""API keys of `longside serve`: only hashes on disk, constant-time lookup, safe rewrites."""

from __future__ import annotations

import json
import os
import stat

import pytest

from longside.cli.main import main as cli
from longside.errors import LongsideError
from longside.server.keys import KeyFile


@pytest.fixture
def path(tmp_path):
    return tmp_path / "server" / "keys.json"


def test_add_list_remove_round_trip(path):
    keys = KeyFile(path)
    assert keys.names() == [] and not path.exists()  # no file until the first user
    a, b = keys.add("alice"), keys.add("bob")
    assert a.startswith("ls-") and a != b
    assert keys.names() == ["alice", "bob"]
    assert KeyFile(path).names() == ["alice", "bob"]
    keys.remove("alice")
    assert KeyFile(path).names() == ["bob"]
    with pytest.raises(LongsideError, match="no user 'alice'"):
        keys.remove("alice")


def test_file_holds_hashes_not_keys(path):
    key = KeyFile(path).add("alice")
    text = path.read_text()
    assert key not in text and key[3:] not in text
    data = json.loads(text)
    assert data["format"] == "longside-keys" and data["version"] == 1
    assert set(data["users"]["alice"]) == {"sha256", "created", "id"}
    assert data["users"]["alice"]["created"].endswith("Z")


def test_store_name_survives_rotation_not_re_adding(path):
    keys = KeyFile(path)
    keys.add("alice")
    first = keys.store_name("alice")
    assert first.startswith("alice+")
    keys.add("alice", replace=True)  # a rotated key: the same user, the same memory
    assert keys.store_name("alice") == first
    keys.remove("alice")
    keys.add("alice")  # the name given to someone new: another memory
    assert keys.store_name("alice") != first


def test_user_for(path):
    keys = KeyFile(path)
    a, b = keys.add("alice"), keys.add("bob")
    assert keys.user_for(a) == "alice" and keys.user_for(b) == "bob"
    for wrong in (a + "x", a[:-1], "", None, 42, b"bytes"):
        assert keys.user_for(wrong) is None


def test_rotation_invalidates_the_old_key(path):
    keys = KeyFile(path)
    old = keys.add("alice")
    with pytest.raises(LongsideError, match="--replace"):
        keys.add("alice")
    new = keys.add("alice", replace=True)
    assert keys.user_for(old) is None and keys.user_for(new) == "alice"


def test_a_running_reader_sees_changes(path):
    """A server's KeyFile picks up keys added and removed by `longside keys` meanwhile."""
    server = KeyFile(path)
    key = KeyFile(path).add("alice")
    assert server.user_for(key) == "alice"
    KeyFile(path).remove("alice")
    assert server.user_for(key) is None
    path.unlink()
    assert server.user_for(key) is None and server.names() == []


@pytest.mark.parametrize("name", ["", ".hidden", "..", "-x", "a/b", "a b", "é", "alice\n", "a" * 65, None])
def test_bad_names_are_refused(path, name):
    with pytest.raises(LongsideError, match="invalid user name"):
        KeyFile(path).add(name)
    assert not path.exists()


def test_names_differing_only_in_case_are_refused(path):
    keys = KeyFile(path)
    keys.add("Alice")
    with pytest.raises(LongsideError, match="only in case"):
        keys.add("alice")


@pytest.mark.parametrize("text", [
    "{not json",
    "[]",
    json.dumps({"format": "other", "version": 1, "users": {}}),
    json.dumps({"format": "longside-keys", "version": 2, "users": {}}),
    json.dumps({"format": "longside-keys", "version": 1, "users": {"alice": {"sha256": "short"}}}),
])
def test_a_bad_file_raises_and_is_left_unchanged(path, text):
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(LongsideError, match=str(path)):
        KeyFile(path)
    assert path.read_text() == text
    assert cli(["keys", "add", "bob", "--keys", str(path)]) == 2  # the CLI says so, and writes nothing
    assert path.read_text() == text


def test_file_is_private(path):
    KeyFile(path).add("alice")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o644)
    KeyFile(path).add("bob")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_cli(path, capsys):
    assert cli(["keys", "add", "alice", "--keys", str(path)]) == 0
    out, err = capsys.readouterr()
    key = out[:-1]
    assert out == key + "\n" and key.startswith("ls-")
    assert "only once" in err and f"--keys {path}" in err
    assert KeyFile(path).user_for(key) == "alice"

    assert cli(["keys", "list", "--keys", str(path)]) == 0
    assert capsys.readouterr().out == "alice\n"
    assert cli(["keys", "add", "alice", "--keys", str(path)]) == 2  # exists: refused
    assert "--replace" in capsys.readouterr().err
    assert cli(["keys", "add", "alice", "--replace", "--keys", str(path)]) == 0
    assert KeyFile(path).user_for(key) is None
    assert cli(["keys", "remove", "alice", "--keys", str(path)]) == 0
    capsys.readouterr()
    assert cli(["keys", "list", "--keys", str(path)]) == 0
    assert capsys.readouterr().out == ""


def test_cli_default_file_is_in_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LONGSIDE_CACHE", str(tmp_path / "cache"))
    assert cli(["keys", "add", "alice"]) == 0
    key = capsys.readouterr().out.strip()
    assert KeyFile(tmp_path / "cache" / "server" / "keys.json").user_for(key) == "alice"
