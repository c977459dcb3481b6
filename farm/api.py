"""The build API: what a build is asked to do, what it says on the way, and how it ends.

Types only, no I/O. ``farm build`` (local or ``--server``), ``farm serve``, the progress renderers,
the wire format and the tests all speak these; ``farm.build.run_build`` takes a ``BuildRequest``,
reports ``PlatformEvent``s and returns a ``BuildResult`` (or raises a ``FarmError``).

    BuildOptions ──┐
    Context ───────┼─► BuildRequest ─► run_build ─► PlatformEvent … ─► BuildResult ─► Pushed | Partial
    Dockerfile ────┘                         └─► FarmError ───────────────────────► Failed | Cancelled

A build's platforms report, each in its own order:

    waiting ─► assigned ─► syncing ─► syncing ─► building ─► log … ─► verifying
                 ▲                                                        │ a node fault
                 └──────────────────────── retrying ◄─────────────────────┘
    done (an unchanged platform reused, nothing dispatched)     failed (at any point)

Each kind of event is its own class with its own payload: a reason, a mode, a digest, a log line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from farm.context import Context
from farm.errors import BuildCancelledError, FarmError, InputError
from farm.platforms import Platform
from farm.registry.name import Reference, parse_reference
from farm.scheduler import Mode, Policy

__all__ = [
    "Assigned",
    "BuildOptions",
    "BuildRequest",
    "BuildResult",
    "BuildState",
    "Building",
    "Cancelled",
    "ContextSync",
    "EventSink",
    "EventState",
    "Failed",
    "LogLine",
    "Outcome",
    "Partial",
    "PlatformEvent",
    "PlatformFailed",
    "PlatformResult",
    "Pushed",
    "Retrying",
    "Reused",
    "Syncing",
    "Verifying",
    "Waiting",
    "outcome_of",
]


class BuildOptions(BaseModel):
    """What to build and how, as the CLI parsed it (the context and Dockerfile travel beside it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tags: tuple[str, ...] = Field(min_length=1)
    platforms: tuple[Platform, ...] = Field(min_length=1)
    build_args: dict[str, str] = Field(default_factory=dict)
    target: str = ""
    insecure_registries: tuple[str, ...] = ()
    append: bool = Field(default=False, description="replace only these platforms in what the tag holds")
    policy: Policy = Field(default_factory=Policy, description="emulation, labels, native wait")
    retries: int = Field(default=2, ge=0, description="other nodes a platform may try after a node fault")
    allow_partial: bool = Field(default=False, description="push what succeeded, list what did not")
    no_cache: bool = Field(default=False, description="build even what an earlier build already made")
    annotations: dict[str, str] = Field(default_factory=dict, description="index annotations")
    network: Literal["default", "host", "none"] = Field(
        default="default",
        description="RUN steps' network, by buildx's names: their own with outbound access, the node's, none",
    )

    @field_validator("tags")
    @classmethod
    def _tags_name_no_digest(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        # Raised as they are, not as pydantic's ValidationError: the user sees farm's message.
        for tag in tags:
            if parse_reference(tag).digest:
                raise InputError(
                    f"tag {tag} names a digest", hint="tag with NAME:TAG; farm computes the digest"
                )
        return tags

    def references(self) -> list[Reference]:
        """The tags, parsed (they were checked as the options were made)."""
        return [parse_reference(tag) for tag in self.tags]


@dataclass(frozen=True)
class BuildRequest:
    """One build, whole: its options, its context as scanned (or as a server received it), and the
    Dockerfile's text. Nothing in it needs reading from disk again."""

    options: BuildOptions
    context: Context
    dockerfile: str


# --- events ---------------------------------------------------------------------------------------

EventState = Literal[
    "waiting", "assigned", "syncing", "building", "log", "verifying", "done", "retrying", "failed"
]


@dataclass(frozen=True)
class ContextSync:
    """What syncing a context to a node moved: the node had the rest already."""

    context_bytes: int
    sent_files: int
    sent_bytes: int

    @property
    def skipped_bytes(self) -> int:
        return max(0, self.context_bytes - self.sent_bytes)


@dataclass(frozen=True)
class _Event:
    platform: Platform
    node: str  # "-" while no node has it
    state: ClassVar[EventState]

    @property
    def summary(self) -> str:
        """The event's payload in words, as progress shows it after the state."""
        raise NotImplementedError


@dataclass(frozen=True)
class Waiting(_Event):
    """No node can take the platform yet (a native slot, a node due back)."""

    reason: str
    state: ClassVar[EventState] = "waiting"

    @property
    def summary(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Assigned(_Event):
    reason: str  # the scheduler's, e.g. "native on pi4 (2 of 4 slots free)"
    state: ClassVar[EventState] = "assigned"

    @property
    def summary(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Syncing(_Event):
    """The context goes to the node: once as it starts (``sent`` None), once as it ends."""

    entries: int
    context_bytes: int
    sent: ContextSync | None = None
    state: ClassVar[EventState] = "syncing"

    @property
    def summary(self) -> str:
        if self.sent is None:
            return f"{self.entries} entries, {self.context_bytes} bytes"
        return f"sent {self.sent.sent_files} files, {self.sent.sent_bytes} bytes"


@dataclass(frozen=True)
class Building(_Event):
    mode: Mode
    state: ClassVar[EventState] = "building"

    @property
    def summary(self) -> str:
        return self.mode


@dataclass(frozen=True)
class LogLine(_Event):
    line: str
    state: ClassVar[EventState] = "log"

    @property
    def summary(self) -> str:
        return self.line


@dataclass(frozen=True)
class Verifying(_Event):
    """Built and pushed by digest; now checked in the registry."""

    digest: str
    state: ClassVar[EventState] = "verifying"

    @property
    def summary(self) -> str:
        return self.digest


@dataclass(frozen=True)
class Reused(_Event):
    """Unchanged since an earlier build whose image is still in the repository: nothing dispatched."""

    digest: str
    state: ClassVar[EventState] = "done"

    @property
    def summary(self) -> str:
        return "unchanged since an earlier build: reused"


@dataclass(frozen=True)
class Retrying(_Event):
    """A node fault on ``node``: the platform goes back to the scheduler without it."""

    reason: str
    state: ClassVar[EventState] = "retrying"

    @property
    def summary(self) -> str:
        return self.reason


@dataclass(frozen=True)
class PlatformFailed(_Event):
    error: str  # the error's message
    state: ClassVar[EventState] = "failed"

    @property
    def summary(self) -> str:
        return self.error


PlatformEvent = (
    Waiting | Assigned | Syncing | Building | LogLine | Verifying | Reused | Retrying | PlatformFailed
)
EventSink = Callable[[PlatformEvent], None]


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlatformResult:
    platform: Platform
    node: str
    mode: Mode
    digest: str
    size: int
    media_type: str
    seconds: float
    reused: bool = False  # unchanged since an earlier build: nothing was dispatched

    def record(self, repository: Reference) -> dict[str, object]:
        """What a later build needs to reuse this image (``farm.build``'s build records)."""
        return {
            "repository": repository.name,
            "digest": self.digest,
            "size": self.size,
            "media_type": self.media_type,
            "node": self.node,
            "mode": self.mode,
        }


@dataclass(frozen=True)
class BuildResult:
    tags: tuple[Reference, ...]
    index_digest: str
    index_media_type: str
    index_size: int
    platforms: tuple[PlatformResult, ...]
    missing: dict[str, str] = field(default_factory=dict)  # platform -> why (with --allow-partial)

    def metadata(self) -> dict[str, Any]:
        """The ``--metadata-file`` document, with buildx's key names where buildx has them."""
        return {
            "containerimage.digest": self.index_digest,
            "containerimage.descriptor": {
                "mediaType": self.index_media_type,
                "digest": self.index_digest,
                "size": self.index_size,
            },
            "image.name": ",".join(str(tag) for tag in self.tags),
            "farm.platforms": {
                str(result.platform): {
                    "digest": result.digest,
                    "node": result.node,
                    "mode": result.mode,
                    "seconds": round(result.seconds, 3),
                }
                for result in self.platforms
            },
            **({"farm.missing": dict(self.missing)} if self.missing else {}),
        }


# --- outcomes -------------------------------------------------------------------------------------
#
# How a build ended, and so what `farm build` exits with, wherever it ran: the CLI, the server's
# history and every client following the build read the same exit code off the same outcome.

BuildState = Literal["succeeded", "partial", "failed", "cancelled"]  # farm serve's names (API, history)


@dataclass(frozen=True)
class Pushed:
    """Every platform built or reused, and the index is under every tag."""

    result: BuildResult
    state: ClassVar[BuildState] = "succeeded"
    exit_code: ClassVar[int] = 0


@dataclass(frozen=True)
class Partial:
    """``--allow-partial``: the index is pushed without the platforms in ``result.missing``."""

    result: BuildResult
    state: ClassVar[BuildState] = "partial"
    exit_code: ClassVar[int] = 3


@dataclass(frozen=True)
class Failed:
    """Nothing was tagged; the error says why (bad input, a failed platform, a bug in farm serve)."""

    error: FarmError
    state: ClassVar[BuildState] = "failed"

    @property
    def exit_code(self) -> int:
        return self.error.exit_code


@dataclass(frozen=True)
class Cancelled:
    """Stopped on request (Ctrl-C, or another client of ``farm serve``) before it was tagged."""

    error: BuildCancelledError
    state: ClassVar[BuildState] = "cancelled"
    exit_code: ClassVar[int] = BuildCancelledError.exit_code


Outcome = Pushed | Partial | Failed | Cancelled


def outcome_of(ended: BuildResult | FarmError) -> Outcome:
    """How a build that returned ``ended`` (a result) or raised it (an error) ended."""
    if isinstance(ended, BuildCancelledError):
        return Cancelled(ended)
    if isinstance(ended, FarmError):
        return Failed(ended)
    return Partial(ended) if ended.missing else Pushed(ended)
