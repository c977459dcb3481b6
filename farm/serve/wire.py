"""What ``farm serve`` and ``farm build --server`` say to each other, as JSON: one definition.

Pure: the build API's values (``farm.api``) in, JSON-ready values out, and back. Errors travel in
their own JSON form (``FarmError.to_json``), so the client raises the very error a local build would
have raised (same class, message, hint, exit code).

The event stream of a build (``GET /api/builds/{id}/events``) is newline-delimited JSON, one
object per line, each with a ``type`` and a ``seq`` (its position in the stream):

    {"type": "queued", "position": 2}          submitted; 2 builds are ahead of it
    {"type": "started"}                        it left the queue
    {"type": "event", "platform": "linux/arm64", "node": "pi4", "state": "building", "mode": "native",
     "detail": "native"}
    {"type": "result", "result": {...}}        the last line: the ``BuildResult``
    {"type": "error", "error": {...}}          or the last line: why it failed, was cancelled or stopped

An event carries its state, its payload by name (``reason``, ``entries``/``context_bytes``/``sent``,
``mode``, ``line``, ``digest``, ``error``) and, for clients older than typed events, ``detail``: the
payload in words. An event a client cannot read (another farm version's) is skipped: events are
progress only, the last line says how the build ended.
"""

from __future__ import annotations

from typing import Any, cast

from farm.api import (
    Assigned,
    Building,
    BuildResult,
    ContextSync,
    LogLine,
    PlatformEvent,
    PlatformFailed,
    PlatformResult,
    Retrying,
    Reused,
    Syncing,
    Verifying,
    Waiting,
)
from farm.errors import FarmError, error_from_json
from farm.platforms import parse_platform
from farm.registry.name import parse_reference
from farm.scheduler import Assign, Decision, Fail, Mode, Wait

__all__ = [
    "decision_from_json",
    "decision_to_json",
    "error_from_json",
    "error_to_json",
    "event_from_json",
    "event_to_json",
    "result_from_json",
    "result_to_json",
]

JSON = dict[str, Any]


def error_to_json(error: FarmError) -> JSON:
    return error.to_json()


def event_to_json(event: PlatformEvent) -> JSON:
    document: JSON = {"platform": str(event.platform), "node": event.node, "state": event.state}
    match event:
        case Waiting(reason=reason) | Assigned(reason=reason) | Retrying(reason=reason):
            document["reason"] = reason
        case Syncing(entries=entries, context_bytes=size, sent=sent):
            document |= {"entries": entries, "context_bytes": size, "sent": _sync_to_json(sent)}
        case Building(mode=mode):
            document["mode"] = mode
        case LogLine(line=line):
            document["line"] = line
        case Verifying(digest=digest) | Reused(digest=digest):
            document["digest"] = digest
        case PlatformFailed(error=error):
            document["error"] = error
    document["detail"] = event.summary
    return document


def event_from_json(document: JSON) -> PlatformEvent | None:
    """The event ``document`` describes; None if this farm cannot read it (see the module's doc)."""
    try:
        platform = parse_platform(str(document["platform"]))
        node = str(document.get("node", ""))
        state = document.get("state")
        # A server older than typed events sends the payload as ``detail`` only.
        text = str(document.get("detail", ""))
        if state == "waiting":
            return Waiting(platform, node, str(document.get("reason", text)))
        if state == "assigned":
            return Assigned(platform, node, str(document.get("reason", text)))
        if state == "retrying":
            return Retrying(platform, node, str(document.get("reason", text)))
        if state == "syncing":
            sent = document.get("sent")
            return Syncing(
                platform,
                node,
                int(document["entries"]),
                int(document["context_bytes"]),
                ContextSync(int(sent["context_bytes"]), int(sent["sent_files"]), int(sent["sent_bytes"]))
                if sent is not None
                else None,
            )
        if state == "building":
            mode = str(document.get("mode", text))
            return Building(platform, node, cast(Mode, mode)) if mode in ("native", "emulated") else None
        if state == "log":
            return LogLine(platform, node, str(document.get("line", text)))
        if state == "verifying":
            return Verifying(platform, node, str(document.get("digest", text)))
        if state == "done":
            return Reused(platform, node, str(document.get("digest", "")))
        if state == "failed":
            return PlatformFailed(platform, node, str(document.get("error", text)))
    except (KeyError, TypeError, ValueError, FarmError):
        return None
    return None


def _sync_to_json(sync: ContextSync | None) -> JSON | None:
    if sync is None:
        return None
    return {"context_bytes": sync.context_bytes, "sent_files": sync.sent_files, "sent_bytes": sync.sent_bytes}


def result_to_json(result: BuildResult) -> JSON:
    return {
        "tags": [str(tag) for tag in result.tags],
        "index_digest": result.index_digest,
        "index_media_type": result.index_media_type,
        "index_size": result.index_size,
        "platforms": [
            {
                "platform": str(item.platform),
                "node": item.node,
                "mode": item.mode,
                "digest": item.digest,
                "size": item.size,
                "media_type": item.media_type,
                "seconds": item.seconds,
                "reused": item.reused,
            }
            for item in result.platforms
        ],
        "missing": dict(result.missing),
    }


def result_from_json(document: JSON) -> BuildResult:
    return BuildResult(
        tags=tuple(parse_reference(str(tag)) for tag in document["tags"]),
        index_digest=str(document["index_digest"]),
        index_media_type=str(document["index_media_type"]),
        index_size=int(document["index_size"]),
        platforms=tuple(
            PlatformResult(
                platform=parse_platform(str(item["platform"])),
                node=str(item["node"]),
                mode=cast(Mode, str(item["mode"])),
                digest=str(item["digest"]),
                size=int(item["size"]),
                media_type=str(item["media_type"]),
                seconds=float(item["seconds"]),
                reused=bool(item.get("reused", False)),
            )
            for item in document["platforms"]
        ),
        missing={str(k): str(v) for k, v in (document.get("missing") or {}).items()},
    )


def decision_to_json(decision: Decision) -> JSON:
    if isinstance(decision, Assign):
        return {
            "kind": "assign",
            "platform": str(decision.platform),
            "node": decision.node,
            "mode": decision.mode,
            "reason": decision.reason,
        }
    if isinstance(decision, Wait):
        return {"kind": "wait", "platform": str(decision.platform), "reason": decision.reason}
    return {
        "kind": "fail",
        "platform": str(decision.platform),
        "message": decision.message,
        "hint": decision.hint,
    }


def decision_from_json(document: JSON) -> Decision:
    platform = parse_platform(str(document["platform"]))
    kind = document.get("kind")
    if kind == "assign":
        mode = cast(Mode, str(document["mode"]))
        return Assign(platform, str(document["node"]), mode, str(document["reason"]))
    if kind == "wait":
        # The server's clock is not ours: when to ask again means nothing here.
        return Wait(platform, str(document["reason"]), None)
    hint = document.get("hint")
    return Fail(platform, str(document.get("message", "")), str(hint) if hint is not None else None)
