"""What ``farm serve`` and ``farm build --server`` say to each other, as JSON: one definition.

Pure: values in, JSON-ready values out, and back. Errors travel with their class name and fields,
so the client raises the very error a local build would have raised (same message, hint, exit
code); a class this client does not know becomes a ``ServerError`` carrying the message.

The event stream of a build (``GET /api/builds/{id}/events``) is newline-delimited JSON, one
object per line, each with a ``type`` and a ``seq`` (its position in the stream):

    {"type": "queued", "position": 2}          submitted; 2 builds are ahead of it
    {"type": "started"}                        it left the queue
    {"type": "event", "platform": "linux/arm64", "node": "pi4", "state": "building", "detail": "native"}
    {"type": "result", "result": {...}}        the last line: the ``BuildResult``
    {"type": "error", "error": {...}}          or the last line: why it failed, was cancelled or stopped
"""

from __future__ import annotations

from typing import Any, cast

from farm.build import BuildResult, PlatformEvent, PlatformResult
from farm.errors import (
    BuildError,
    BuildFailedError,
    ContextError,
    FarmError,
    InputError,
    InventoryError,
    NodeError,
    PlanError,
    PlatformError,
    ReferenceError_,
    RegistryError,
    ServerBugError,
    ServerError,
    VerificationError,
)
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

_PLAIN: dict[str, type[FarmError]] = {
    cls.__name__: cls
    for cls in (
        FarmError,
        InputError,
        PlatformError,
        InventoryError,
        ReferenceError_,
        ContextError,
        PlanError,
        VerificationError,
    )
}


def error_to_json(error: FarmError) -> JSON:
    document: JSON = {
        "class": type(error).__name__,
        "message": error.message,
        "hint": error.hint,
        "exit_code": error.exit_code,
    }
    if isinstance(error, NodeError):
        document |= {"node": error.node, "retryable": error.retryable}
    elif isinstance(error, BuildError):
        document["log_tail"] = list(error.log_tail)
    elif isinstance(error, RegistryError):
        document |= {"status": error.status, "request": error.request}
    elif isinstance(error, ServerError):
        document["status"] = error.status
    elif isinstance(error, BuildFailedError):
        document["failures"] = {platform: error_to_json(f) for platform, f in error.failures.items()}
    return document


def error_from_json(document: JSON) -> FarmError:
    """The error the server describes, as the class it was raised as where this client knows it."""
    name = str(document.get("class", ""))
    message = str(document.get("message", "the server reported an error without a message"))
    hint = document.get("hint")
    hint = str(hint) if hint is not None else None
    if name in _PLAIN:
        return _PLAIN[name](message, hint=hint)
    if name == "NodeError":
        return NodeError(
            message, node=str(document.get("node", "")), retryable=bool(document.get("retryable")), hint=hint
        )
    if name == "BuildError":
        tail = tuple(str(line) for line in document.get("log_tail") or ())
        return BuildError(message, log_tail=tail, hint=hint)
    if name == "RegistryError":
        return RegistryError(
            message, status=_int_or_none(document.get("status")), request=document.get("request"), hint=hint
        )
    if name == "BuildFailedError":
        failures = document.get("failures") or {}
        return BuildFailedError({str(p): error_from_json(f) for p, f in failures.items()})
    if name == "ServerBugError" or document.get("exit_code") == ServerBugError.exit_code:
        return ServerBugError(message, status=_int_or_none(document.get("status")), hint=hint)
    if document.get("exit_code") == InputError.exit_code:
        return InputError(message, hint=hint)
    return ServerError(message, status=_int_or_none(document.get("status")), hint=hint)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def event_to_json(event: PlatformEvent) -> JSON:
    return {"platform": str(event.platform), "node": event.node, "state": event.state, "detail": event.detail}


def event_from_json(document: JSON) -> PlatformEvent:
    return PlatformEvent(
        parse_platform(str(document["platform"])),
        str(document.get("node", "")),
        str(document.get("state", "")),
        str(document.get("detail", "")),
    )


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
