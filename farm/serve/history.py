"""The server's build history, in SQLite in the state folder: every build and every platform of it.

A build row is written when the build is submitted and updated when it starts and ends; its
platform rows are written when it ends. So a crash loses nothing that had happened: at the next
start, ``recover`` finds the builds still ``queued`` or ``running`` and marks them failed with the
reason. They are not run again: their clients saw the server go away and reported a failure, and
a build re-run behind their back could still move a tag after the CI job said it had failed.

The connection is used from the event loop's thread only; each write is one short transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import InputError, ServerError

__all__ = ["INTERRUPTED_QUEUED", "INTERRUPTED_RUNNING", "BuildRow", "History", "PlatformRow"]

INTERRUPTED_RUNNING = "the server stopped while it ran"
INTERRUPTED_QUEUED = "the server stopped before it ran"

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    id           TEXT PRIMARY KEY,
    submitter    TEXT NOT NULL,
    tags         TEXT NOT NULL,      -- JSON list of references
    platforms    TEXT NOT NULL,      -- JSON list of platforms asked for
    options      TEXT NOT NULL,      -- JSON: the BuildOptions as submitted
    context      TEXT NOT NULL,      -- the context digest
    state        TEXT NOT NULL,      -- queued | running | succeeded | partial | failed | cancelled
    submitted_at REAL NOT NULL,      -- seconds since the epoch
    started_at   REAL,
    ended_at     REAL,
    error        TEXT,               -- why it failed, one line
    error_json   TEXT,               -- the error as clients receive it
    exit_code    INTEGER,            -- what `farm build` exits with for it
    index_digest TEXT,
    result       TEXT                -- JSON: the BuildResult
);
CREATE INDEX IF NOT EXISTS builds_by_time ON builds (submitted_at);
CREATE INDEX IF NOT EXISTS builds_by_state ON builds (state);
CREATE TABLE IF NOT EXISTS platforms (
    build_id TEXT NOT NULL REFERENCES builds (id),
    platform TEXT NOT NULL,
    node     TEXT,
    mode     TEXT,                   -- native | emulated
    seconds  REAL,
    digest   TEXT,
    result   TEXT NOT NULL,          -- running | success | reused | failure | missing | cancelled
    error    TEXT,
    PRIMARY KEY (build_id, platform)
);
"""


@dataclass(frozen=True)
class PlatformRow:
    platform: str
    node: str | None
    mode: str | None
    seconds: float | None
    digest: str | None
    result: str
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "node": self.node,
            "mode": self.mode,
            "seconds": self.seconds,
            "digest": self.digest,
            "state": self.result,
            "error": self.error,
        }


@dataclass(frozen=True)
class BuildRow:
    id: str
    submitter: str
    tags: list[str]
    platforms: list[str]
    context: str
    state: str
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    error: str | None
    error_json: dict[str, Any] | None
    exit_code: int | None
    index_digest: str | None
    result: dict[str, Any] | None
    platform_rows: tuple[PlatformRow, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "submitter": self.submitter,
            "tags": self.tags,
            "platforms": self.platforms,
            "context": self.context,
            "state": self.state,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "error": self.error,
            "exit_code": self.exit_code,
            "index_digest": self.index_digest,
            "platform_results": [row.to_json() for row in self.platform_rows],
        }


class History:
    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, path: Path) -> History:
        """Open (or create) the history database; an unusable one is the operator's to fix."""
        try:
            # Private from the start: SQLite gives its -wal and -shm files the database's mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            connection = sqlite3.connect(path, isolation_level=None)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute("PRAGMA foreign_keys = ON")
            version = int(connection.execute("PRAGMA user_version").fetchone()[0])
            if version > _SCHEMA_VERSION:
                raise InputError(
                    f"build history {path} was written by a newer farm (schema {version})",
                    hint="run that farm, or start this one with another --state-dir",
                )
            connection.executescript(_SCHEMA)
            connection.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            raise InputError(
                f"cannot use the build history {path}: {exc}",
                hint="check that the state folder is writable by this user and the file is a farm "
                "history (move it away to start afresh)",
            ) from exc
        return cls(connection, path)

    def close(self) -> None:
        self._db.close()

    def recover(self, now: float) -> list[str]:
        """Mark builds a previous run left queued or running as failed; return their ids.

        Their platforms that were building keep the node and mode they were building with.
        """
        interrupted: list[str] = []
        with self._transaction():
            for state, reason in (("running", INTERRUPTED_RUNNING), ("queued", INTERRUPTED_QUEUED)):
                ids = [
                    str(row["id"])
                    for row in self._db.execute("SELECT id FROM builds WHERE state = ?", (state,))
                ]
                if not ids:
                    continue
                interrupted += ids
                error = ServerError(reason)  # as a server stopping now ends them (``Coordinator._stopped``)
                chosen = json.dumps(ids)
                self._db.execute(
                    "UPDATE builds SET state = 'failed', ended_at = ?, error = ?, error_json = ?,"
                    " exit_code = ? WHERE id IN (SELECT value FROM json_each(?))",
                    (now, reason, json.dumps(error.to_json()), error.exit_code, chosen),
                )
                self._db.execute(
                    "UPDATE platforms SET result = 'failure', error = ?"
                    " WHERE result = 'running' AND build_id IN (SELECT value FROM json_each(?))",
                    (reason, chosen),
                )
                self._db.execute(
                    "INSERT OR IGNORE INTO platforms (build_id, platform, result, error)"
                    " SELECT builds.id, each.value, 'failure', ?"
                    " FROM builds, json_each(builds.platforms) AS each"
                    " WHERE builds.id IN (SELECT value FROM json_each(?))",
                    (reason, chosen),
                )
        return interrupted

    def platform_started(self, build_id: str, platform: str, node: str, mode: str) -> None:
        """A platform began building: kept now, so a crash still tells where it was building."""
        self._db.execute(
            "INSERT OR REPLACE INTO platforms (build_id, platform, node, mode, result)"
            " VALUES (?, ?, ?, ?, 'running')",
            (build_id, platform, node, mode),
        )

    def add(
        self,
        build_id: str,
        *,
        submitter: str,
        tags: list[str],
        platforms: list[str],
        options: dict[str, Any],
        context: str,
        submitted_at: float,
    ) -> None:
        self._db.execute(
            "INSERT INTO builds (id, submitter, tags, platforms, options, context, state, submitted_at)"
            " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
            (
                build_id,
                submitter,
                json.dumps(tags),
                json.dumps(platforms),
                json.dumps(options),
                context,
                submitted_at,
            ),
        )

    def start(self, build_id: str, started_at: float) -> None:
        self._db.execute(
            "UPDATE builds SET state = 'running', started_at = ? WHERE id = ?", (started_at, build_id)
        )

    def finish(
        self,
        build_id: str,
        *,
        state: str,
        ended_at: float,
        platforms: list[PlatformRow],
        exit_code: int,
        error: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE builds SET state = ?, ended_at = ?, error = ?, error_json = ?, exit_code = ?,"
                " index_digest = ?, result = ? WHERE id = ?",
                (
                    state,
                    ended_at,
                    error["message"] if error else None,
                    json.dumps(error) if error else None,
                    exit_code,
                    result["index_digest"] if result else None,
                    json.dumps(result) if result else None,
                    build_id,
                ),
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO platforms"
                " (build_id, platform, node, mode, seconds, digest, result, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (build_id, r.platform, r.node, r.mode, r.seconds, r.digest, r.result, r.error)
                    for r in platforms
                ],
            )

    def get(self, build_id: str) -> BuildRow | None:
        row = self._db.execute("SELECT * FROM builds WHERE id = ?", (build_id,)).fetchone()
        if row is None:
            return None
        return self._build_row(row, self._platform_rows([build_id]).get(build_id, ()))

    def recent(self, limit: int = 50, states: tuple[str, ...] = ()) -> list[BuildRow]:
        """The latest builds, newest first (only those in ``states`` if given)."""
        where = f"WHERE state IN ({', '.join('?' * len(states))})" if states else ""
        rows = self._db.execute(
            f"SELECT * FROM builds {where} ORDER BY submitted_at DESC, rowid DESC LIMIT ?",
            (*states, limit),
        ).fetchall()
        platforms = self._platform_rows([str(row["id"]) for row in rows])
        return [self._build_row(row, platforms.get(str(row["id"]), ())) for row in rows]

    def _platform_rows(self, ids: list[str]) -> dict[str, tuple[PlatformRow, ...]]:
        found: dict[str, list[PlatformRow]] = {}
        for row in self._db.execute(
            "SELECT * FROM platforms WHERE build_id IN (SELECT value FROM json_each(?)) ORDER BY rowid",
            (json.dumps(ids),),
        ):
            found.setdefault(str(row["build_id"]), []).append(
                PlatformRow(
                    platform=row["platform"],
                    node=row["node"],
                    mode=row["mode"],
                    seconds=row["seconds"],
                    digest=row["digest"],
                    result=row["result"],
                    error=row["error"],
                )
            )
        return {key: tuple(value) for key, value in found.items()}

    @staticmethod
    def _build_row(row: sqlite3.Row, platforms: tuple[PlatformRow, ...]) -> BuildRow:
        return BuildRow(
            id=row["id"],
            submitter=row["submitter"],
            tags=json.loads(row["tags"]),
            platforms=json.loads(row["platforms"]),
            context=row["context"],
            state=row["state"],
            submitted_at=row["submitted_at"],
            started_at=row["started_at"],
            ended_at=row["ended_at"],
            error=row["error"],
            error_json=json.loads(row["error_json"]) if row["error_json"] else None,
            exit_code=row["exit_code"],
            index_digest=row["index_digest"],
            result=json.loads(row["result"]) if row["result"] else None,
            platform_rows=platforms,
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN … COMMIT, or ROLLBACK on an error (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
