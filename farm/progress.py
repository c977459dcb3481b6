"""Rendering a build's progress: ``plain`` prefixed lines for logs and CI, or a live ``tty`` view."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from farm.api import LogLine, PlatformEvent, PlatformFailed
from farm.platforms import Platform

__all__ = ["PlainProgress", "TtyProgress", "make_progress"]


class PlainProgress:
    """Every event and log line as it comes, prefixed with its platform and node."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, event: PlatformEvent) -> None:
        prefix = f"[{event.platform} {event.node}]"
        if isinstance(event, LogLine):
            text = f"{prefix} {event.line}"
        else:
            summary = event.summary
            text = f"{prefix} {event.state}{': ' + summary if summary else ''}"
        print(text, file=self._stream, flush=True)

    def close(self) -> None:
        pass


class TtyProgress:
    """One live line per platform: state, node, elapsed time and its last log line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._rows: dict[Platform, list[str]] = {}
        self._started: dict[Platform, float] = {}
        self._ended: dict[Platform, float] = {}
        self._drawn = 0
        self._last_draw = 0.0

    def __call__(self, event: PlatformEvent) -> None:
        row = self._rows.setdefault(event.platform, ["queued", event.node, ""])
        self._started.setdefault(event.platform, time.monotonic())
        if isinstance(event, LogLine):
            row[2] = event.line
        else:
            row[0], row[1] = event.state, event.node
            if event.state in ("done", "failed"):
                self._ended[event.platform] = time.monotonic()
            if isinstance(event, PlatformFailed):
                row[2] = event.error
        now = time.monotonic()
        if not isinstance(event, LogLine) or now - self._last_draw > 0.1:
            self._draw(now)

    def close(self) -> None:
        self._draw(time.monotonic())

    def _draw(self, now: float) -> None:
        self._last_draw = now
        width = shutil.get_terminal_size((100, 20)).columns
        out = self._stream
        if self._drawn:
            out.write(f"\x1b[{self._drawn}F")
        for platform, (state, node, last) in self._rows.items():
            elapsed = self._ended.get(platform, now) - self._started[platform]
            line = f"{platform!s:<15} {state:<10} {node:<12} {elapsed:6.1f}s  {last}"
            out.write("\x1b[2K" + line[: width - 1] + "\n")
        self._drawn = len(self._rows)
        out.flush()


def make_progress(mode: str, stream: TextIO = sys.stderr) -> PlainProgress | TtyProgress:
    if mode == "tty" or (mode == "auto" and stream.isatty()):
        return TtyProgress(stream)
    return PlainProgress(stream)
