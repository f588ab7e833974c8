"""A guard for tests that run network clients: a name lookup or a connection to anything but this machine fails at
once, before a packet leaves. A subprocess gets it from tests/loopback/sitecustomize.py (that folder first on
PYTHONPATH, see `guarded_env`)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

LOOPBACK = ("127.0.0.1", "::1", "localhost")
SITE = Path(__file__).resolve().parent / "loopback"


class NotLoopback(OSError):
    pass


def install(setattr=setattr) -> None:
    """Replace the socket functions that reach other machines (`setattr`: e.g. pytest's monkeypatch.setattr)."""
    getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

    def loopback_getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in LOOPBACK:
            raise NotLoopback(f"test guard: {name!r} is not this machine (only {', '.join(LOOPBACK)})")
        return getaddrinfo(host, *args, **kwargs)

    def loopback_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            raise NotLoopback(f"test guard: {address[0]} is not this machine")
        return connect(self, address)

    setattr(socket, "getaddrinfo", loopback_getaddrinfo)
    setattr(socket.socket, "connect", loopback_connect)


def guarded_env(**values: str) -> dict:
    """This process's environment for a subprocess that may reach 127.0.0.1 only: the guard installed, no proxy,
    no Hugging Face settings or token of the machine's user, and `values` on top."""
    root = str(SITE.parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), str(SITE.parent), root, env.get("PYTHONPATH")]))
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env.update(values)
    return env
