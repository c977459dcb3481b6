"""Build slots held on the node itself, so that no number of coordinators can overload it.

A slot is an exclusive ``flock`` on ``WORKDIR/slots/N``; the kernel drops it when the agent dies,
so a crashed coordinator or agent never leaks one. Two ``farm build`` runs from two machines (or a
``farm serve`` and a laptop) share a Pi's slots through these files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from typing import IO, Callable

__all__ = ["hold_slot"]

_POLL_SECONDS = 0.5


@contextlib.contextmanager
def hold_slot(
    workdir: str, slots: int, cancelled: threading.Event, on_wait: Callable[[], None]
) -> Iterator[int]:
    """Take one of the node's ``slots``; wait (calling ``on_wait`` once) while all are taken."""
    folder = os.path.join(workdir, "slots")
    os.makedirs(folder, exist_ok=True)
    waited = False
    while True:
        for number in range(max(1, slots)):
            handle = _try_lock(os.path.join(folder, str(number)))
            if handle is not None:
                try:
                    yield number
                finally:
                    handle.close()  # closing the file releases the lock
                return
        if not waited:
            on_wait()
            waited = True
        if cancelled.wait(_POLL_SECONDS):
            raise InterruptedError("cancelled while waiting for a slot")


def _try_lock(path: str) -> IO[str] | None:
    handle = open(path, "a")  # noqa: SIM115 - held open for as long as the slot is
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle
