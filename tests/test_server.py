"""`longside serve` through real clients: the official `openai` package (streaming and not),
plain httpx for the memory endpoints and every refusal, users kept apart, memory kept across
a restart and a kill -9, idle users leaving RAM and coming back. Each test starts its own
server on a free loopback port (the shipped checkpoint, real SmolLM2)."""

from __future__ import annotations

import concurrent.futures
import json
import random

import httpx
import openai
import pytest

from longside.cli import serve as serve_cli
from longside.errors import LongsideError
from longside.server.keys import KeyFile

try:
    from tests.server_util import running_server
except ModuleNotFoundError as e:  # bare `pytest` puts tests/ itself on sys.path, not the repo
    if e.name != "tests":
        raise
    from server_util import running_server

SECRETS = {"alice": "The code of the blue vault is 4417. Alice keeps the spare key under the red lamp.",
           "bob": "Bob's locker combination is 9052. He parks the green bicycle behind the library.",
           "carol": "Carol's cat is called Pistachio and sleeps on the piano every afternoon."}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve") / "store", users=list(SECRETS),
                        args=["--max-body-mb", "1"]) as s:
        yield s


def _client(server, user):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys[user], max_retries=0)


def _add(server, user, text, name="notes.txt"):
    r = httpx.post(server.url + "/v1/memories/documents", headers=server.headers(user),
                   json={"name": name, "text": text}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _memory(server, user):
    r = httpx.get(server.url + "/v1/memories", headers=server.headers(user), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_client_models_and_chat(server):
    client = _client(server, "alice")
    assert [m.id for m in client.models.list().data] == ["longside-smollm2-135m"]
    reply = client.chat.completions.create(model="longside", max_tokens=8,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length") and 0 < reply.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model="longside-smollm2-135m", max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": "Name three colours."}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].choices[0].finish_reason in ("stop", "length")
    # a stop string ends the reply before it
    stopped = client.chat.completions.create(model="longside", max_tokens=30, stop=["Paris"],
                                             messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" not in stopped.choices[0].message.content


def test_documents_are_each_users_own(server):
    for user, text in SECRETS.items():
        done = _add(server, user, text, name=f"{user}.txt")
        assert done["document"]["name"] == f"{user}.txt" and done["document"]["tokens"] > 10
    seen = {u: _memory(server, u) for u in SECRETS}
    for user, mem in seen.items():
        assert mem["user"] == user and [d["name"] for d in mem["documents"]] == [f"{user}.txt"]
        assert mem["tokens"] >= mem["documents"][0]["tokens"] and mem["sha256"]
    # a request naming another user changes nothing: there is no way to say whose memory
    r = httpx.request("DELETE", server.url + "/v1/memories?user=alice", headers=server.headers("bob"),
                      json={"user": "alice"}, timeout=60)
    assert r.status_code == 200 and r.json()["memory"]["user"] == "bob" and r.json()["memory"]["tokens"] == 0
    assert _memory(server, "alice") == seen["alice"]
    assert _memory(server, "carol") == seen["carol"]
    # the memory is read: alice's answer can come from her document, never from carol's
    reply = _client(server, "alice").chat.completions.create(
        model="longside", max_tokens=24, messages=[{"role": "user", "content": "What is the code of the blue vault?"}])
    assert "Pistachio" not in reply.choices[0].message.content


def test_document_progress_is_streamed(server):
    text = " ".join(["The harbour master logged the tides at dawn and again at dusk."] * 200)
    events = []
    with httpx.stream("POST", server.url + "/v1/memories/documents", headers=server.headers("carol"),
                      json={"name": "tides.txt", "text": text, "stream": True}, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    progress = [e for e in events if "tokens_done" in e]
    assert len(progress) >= 2 and progress[-1]["tokens_done"] == progress[-1]["tokens_total"]
    assert [p["tokens_done"] for p in progress] == sorted(p["tokens_done"] for p in progress)
    assert events[-1]["document"]["name"] == "tides.txt"


@pytest.mark.parametrize("case", ["no key", "wrong key", "malformed json", "not an object", "oversize",
                                  "unknown model", "negative max_tokens", "no messages", "last not user",
                                  "bad temperature", "empty document", "n=2", "text/plain", "foreign origin",
                                  "max_tokens too large", "unknown route"])
def test_refusals(server, case):
    url, good = server.url, server.headers("alice")
    chat = {"model": "longside", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    requests = {
        "no key": ("GET", "/v1/memories", {}, None, 401),
        "wrong key": ("POST", "/v1/chat/completions", {"Authorization": "Bearer ls-wrong"}, chat, 401),
        "malformed json": ("POST", "/v1/chat/completions", good, b'{"model": "longside", "messages": [', 400),
        "not an object": ("POST", "/v1/chat/completions", good, b"[1, 2]", 400),
        "oversize": ("POST", "/v1/memories/documents", good, {"text": "x" * (2 << 20)}, 413),
        "unknown model": ("POST", "/v1/chat/completions", good, {**chat, "model": "gpt-4o"}, 404),
        "negative max_tokens": ("POST", "/v1/chat/completions", good, {**chat, "max_tokens": -5}, 400),
        "no messages": ("POST", "/v1/chat/completions", good, {**chat, "messages": []}, 400),
        "last not user": ("POST", "/v1/chat/completions", good,
                          {**chat, "messages": [{"role": "assistant", "content": "hi"}]}, 400),
        "bad temperature": ("POST", "/v1/chat/completions", good, {**chat, "temperature": "hot"}, 400),
        "empty document": ("POST", "/v1/memories/documents", good, {"text": "   "}, 400),
        "n=2": ("POST", "/v1/chat/completions", good, {**chat, "n": 2}, 400),
        # what a foreign web page can send through the user's browser
        "text/plain": ("POST", "/v1/memories/documents", {**good, "Content-Type": "text/plain"},
                       {"text": "planted"}, 415),
        "foreign origin": ("POST", "/v1/memories/documents", {**good, "Origin": "http://evil.example"},
                           {"text": "planted"}, 403),
        "max_tokens too large": ("POST", "/v1/chat/completions", good, {**chat, "max_tokens": 10 ** 9}, 400),
        "unknown route": ("GET", "/v1/users/bob/memories", good, None, 404),
    }
    method, path, headers, body, status = requests[case]
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    before = _memory(server, "alice")
    r = httpx.request(method, url + path, headers={"Content-Type": "application/json", **headers},
                      content=content, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"]
    assert _memory(server, "alice") == before  # a refused request changes nothing


def test_concurrent_users_are_batched_and_kept_apart(server):
    """Randomized requests of three users at once: replies, listings and memories never
    show another user's text, and the engine decodes several users per step."""
    stats0 = httpx.get(server.url + "/v1/stats", headers=server.headers("alice")).json()
    for user, text in SECRETS.items():
        httpx.delete(server.url + "/v1/memories", headers=server.headers(user), timeout=60)
        _add(server, user, text, name=f"{user}-secret.txt")
    rng = random.Random(0)
    marks = {"alice": "4417", "bob": "9052", "carol": "Pistachio"}

    def one(i):
        user = rng.choice(list(SECRETS))
        if i % 3:
            reply = _client(server, user).chat.completions.create(
                model="longside", max_tokens=12, messages=[{"role": "user", "content": "What do you remember?"}])
            out = reply.choices[0].message.content
        else:
            out = json.dumps(_memory(server, user))
        return user, out

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(24)))
    for user, out in results:
        others = [m for u, m in marks.items() if u != user]
        assert not any(m in out for m in others), (user, out)
    stats = httpx.get(server.url + "/v1/stats", headers=server.headers("alice")).json()
    steps, rows = stats["steps"] - stats0["steps"], stats["rows_stepped"] - stats0["rows_stepped"]
    assert stats["batched"] and steps > 0 and rows > steps  # some steps decoded several users at once


def test_restart_and_kill_keep_memory(tmp_path):
    store, keys = tmp_path / "store", tmp_path / "keys.json"
    headers = {"Authorization": f"Bearer {KeyFile(keys).add('dora')}"}
    long_text = " ".join(["The ferry to Skerry Rock leaves at seven and returns at noon."] * 400)
    with running_server(store, keys=keys) as s:
        r = httpx.post(s.url + "/v1/memories/documents", headers=headers, json={"name": "a", "text": SECRETS["alice"]},
                       timeout=120)
        assert r.status_code == 200, r.text
        openai.OpenAI(base_url=s.url + "/v1", api_key=headers["Authorization"][7:]).chat.completions.create(
            model="longside", max_tokens=6, messages=[{"role": "user", "content": "Hello!"}])
        before = httpx.get(s.url + "/v1/memories", headers=headers, timeout=60).json()
    assert before["turns"] == 1 and before["sha256"]
    with running_server(store, keys=keys) as s:  # a plain restart
        assert httpx.get(s.url + "/v1/memories", headers=headers, timeout=60).json() == before
        # kill -9 while a long document is being memorized: it is lost whole, nothing else
        with httpx.stream("POST", s.url + "/v1/memories/documents", headers=headers,
                          json={"name": "long.txt", "text": long_text, "stream": True}, timeout=300) as r:
            for line in r.iter_lines():
                if "tokens_done" in line:
                    s.kill()
                    break
    with running_server(store, keys=keys) as s:
        assert httpx.get(s.url + "/v1/memories", headers=headers, timeout=60).json() == before
        saved = [p.name for p in (store / "users").iterdir()]
        assert len(saved) == 1 and saved[0].startswith("dora+")  # no half-written save left behind


def test_without_keys_one_local_user_on_loopback_only(tmp_path):
    with running_server(tmp_path / "store") as s:
        r = httpx.get(s.url + "/v1/memories", timeout=60)
        assert r.status_code == 200 and r.json()["user"] == "local"
        # a page on another name that resolves to 127.0.0.1 (DNS rebinding) is refused
        r = httpx.get(s.url + "/v1/memories", headers={"Host": "evil.example"}, timeout=60)
        assert r.status_code == 403 and r.json()["error"]["code"] == "foreign_host"


def test_a_name_added_again_is_a_new_user(tmp_path):
    keys = tmp_path / "keys.json"
    first = KeyFile(keys).add("gus")
    with running_server(tmp_path / "store", keys=keys) as s:
        r = httpx.post(s.url + "/v1/memories/documents", headers={"Authorization": f"Bearer {first}"},
                       json={"name": "private.txt", "text": SECRETS["bob"]}, timeout=120)
        assert r.status_code == 200, r.text
        KeyFile(keys).remove("gus")
        second = KeyFile(keys).add("gus")  # someone else under the same name: a running server sees it
        r = httpx.get(s.url + "/v1/memories", headers={"Authorization": f"Bearer {second}"}, timeout=60)
        assert r.status_code == 200 and r.json()["tokens"] == 0 and r.json()["documents"] == []
        r = httpx.get(s.url + "/v1/memories", headers={"Authorization": f"Bearer {first}"}, timeout=60)
        assert r.status_code == 401


def test_idle_users_leave_ram_and_come_back(tmp_path):
    with running_server(tmp_path / "store", users=["erin", "finn"], args=["--max-resident-gb", "0.000001"]) as s:
        _add(s, "erin", SECRETS["alice"])
        _add(s, "finn", SECRETS["bob"])
        erin = _memory(s, "erin")
        stats = httpx.get(s.url + "/v1/stats", headers=s.headers("finn")).json()
        assert stats["resident_users"] <= 1  # erin left RAM after her last request
        assert _memory(s, "erin") == erin  # and came back from disk as she was


@pytest.mark.parametrize("argv, message", [(["--batch-wait-ms", "60"], "--batch-wait-ms"),
                                           (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
                                           (["--max-batch", "0"], "--max-batch")])
def test_serve_refuses_bad_options_before_loading_anything(argv, message):
    with pytest.raises(LongsideError, match=message):
        serve_cli.main(argv)


def test_serve_refuses_a_checkpoint_it_cannot_serve_and_frees_the_port(tmp_path):
    import socket

    from longside.loading import load_model
    model, _ = load_model()
    model.use_backbone_memory([28, 29])  # its rows cannot share a batch
    model.save_pretrained(tmp_path / "ckpt")
    with socket.socket() as probe:  # a port free now; the refusal must leave it free again
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(LongsideError, match="reads backbone memory"):
        serve_cli.main(["--model", str(tmp_path / "ckpt"), "--port", str(port), "--store", str(tmp_path / "store")])
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_serve_refuses_a_window_carry_the_window_cannot_hold(tmp_path):
    with pytest.raises(LongsideError, match="window_carry"):
        serve_cli.main(["--window-carry", "1024", "--port", "0", "--store", str(tmp_path / "store")])
