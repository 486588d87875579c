"""Start and stop a real `longside serve` process on a free loopback port (tests, the bench)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx

from longside.server.keys import KeyFile


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    keys: dict[str, str] = field(default_factory=dict)  # user -> API key
    key: str | None = None  # the first user's key (None: no key file)

    def headers(self, user: str | None = None) -> dict[str, str]:
        key = self.keys[user] if user is not None else self.key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def kill(self) -> None:
        """kill -9: no shutdown, no flush, nothing."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)


@contextlib.contextmanager
def running_server(store: str | Path, keys: str | Path | None = None, users: list[str] | None = None,
                   args: list[str] | None = None, timeout: float = 180.0) -> Iterator[Server]:
    """`longside serve --port 0` on `store`; with `users`, a key file is made (or added to)
    beside the store with a key for each. Stops the server on exit (if it still runs)."""
    store = Path(store)
    made: dict[str, str] = {}
    if users:
        keys = Path(keys) if keys is not None else store.parent / f"{store.name}-keys.json"
        kf = KeyFile(keys)
        made = {u: kf.add(u, replace=True) for u in users}
    cmd = [sys.executable, "-m", "longside", "serve", "--port", "0", "--store", str(store), *(args or [])]
    if keys is not None:
        cmd += ["--keys", str(keys)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url, seen = None, []
    try:
        deadline = time.monotonic() + timeout
        while url is None:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("longside serve exited before listening:\n" + "".join(seen))
            seen.append(line)
            m = re.search(r"on (http://\S+) ", line)
            if m:
                url = m.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError("longside serve did not start in time:\n" + "".join(seen))
        server = Server(url, proc, made, next(iter(made.values()), None))
        # keep reading its output, so that a full pipe never blocks the server
        threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True).start()
        while True:  # listening is announced before uvicorn accepts: wait until it answers
            try:
                httpx.get(url + "/v1/models", headers=server.headers(), timeout=5)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("longside serve did not answer:\n" + "".join(seen)) from None
                time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()
