"""``farm serve``, the long-lived coordinator of a shared lab, and its client ``farm build --server``.

app.py          the HTTP API (aiohttp), the token, the server's life
coordinator.py  the queue, the builds it runs (farm.build.run_build), its node pool (farm.pool)
queue.py        fair between submitters                                         (pure)
history.py      every build and platform, in SQLite in the state folder
state.py        the state folder: token, lock, history, content store
contexts.py     contexts received incrementally, taken by builds from the store
page.py         the status page                                                 (pure)
wire.py         the JSON both sides speak                                       (pure)
client.py       farm build --server (httpx)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from farm.serve.app import ServeOptions, serve
    from farm.serve.client import ServerOptions, read_token, remote_build, remote_plan

__all__ = ["ServeOptions", "ServerOptions", "read_token", "remote_build", "remote_plan", "serve"]

# Each name is imported when first used: the server side (aiohttp, prometheus-client) by `farm serve`
# only, the client (httpx) by `farm build --server` only, and neither by whoever needs just the pure
# modules (``farm.serve.wire``, ``farm.serve.queue``).
_HOMES = {
    "ServeOptions": "farm.serve.app",
    "serve": "farm.serve.app",
    "ServerOptions": "farm.serve.client",
    "read_token": "farm.serve.client",
    "remote_build": "farm.serve.client",
    "remote_plan": "farm.serve.client",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(name)
    return getattr(importlib.import_module(_HOMES[name]), name)
