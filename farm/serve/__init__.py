"""``farm serve``, the long-lived coordinator of a shared lab, and its client ``farm build --server``.

app.py          the HTTP API (aiohttp), the token, the server's life
coordinator.py  the queue, the builds it runs (farm.build.run_build), the nodes it watches
queue.py        fair between submitters                                         (pure)
history.py      every build and platform, in SQLite in the state folder
state.py        the state folder: token, lock, history, content store
contexts.py     contexts received incrementally, laid out for builds
page.py         the status page                                                 (pure)
wire.py         the JSON both sides speak                                       (pure)
client.py       farm build --server (httpx)
"""

from farm.serve.client import ServerOptions, read_token, remote_build, remote_plan

__all__ = ["ServeOptions", "ServerOptions", "read_token", "remote_build", "remote_plan", "serve"]


def __getattr__(name: str) -> object:
    # The server side (aiohttp, prometheus-client) is imported only by `farm serve`.
    if name in ("ServeOptions", "serve"):
        from farm.serve import app

        return getattr(app, name)
    raise AttributeError(name)
