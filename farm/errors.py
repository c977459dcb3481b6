"""Every error a farm user can meet, in one tree.

    FarmError                  exit 1 unless a subclass says otherwise
    ├── InputError             the user's input is wrong (exit 2)
    │   ├── PlatformError      an unknown or malformed platform
    │   ├── InventoryError     an inventory file that does not validate
    │   ├── ReferenceError_    an image reference or tag that does not parse
    │   └── ContextError       a missing context or Dockerfile, a bad .dockerignore
    ├── PlanError              no node can build what was asked
    ├── NodeError              a node failed (unreachable, agent died): another node may do it
    ├── BuildError             the build itself failed: it would fail anywhere
    ├── RegistryError          the registry refused or could not be reached
    ├── VerificationError      a pushed image is not of the platform it claims
    ├── BuildFailedError       one or more platforms failed; nothing was tagged
    └── ServerError            a `farm serve` refused a request or could not be reached
        └── ServerBugError     the server hit a bug in farm (exit 70, as a local bug does)

Each carries a one-line ``message`` and an optional ``hint`` saying what to do next. Only the CLI
turns them into text and exit codes.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BuildError",
    "BuildFailedError",
    "ContextError",
    "FarmError",
    "InputError",
    "InventoryError",
    "NodeError",
    "PlanError",
    "PlatformError",
    "ReferenceError_",
    "RegistryError",
    "ServerBugError",
    "ServerError",
    "VerificationError",
]


class FarmError(Exception):
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InputError(FarmError):
    exit_code = 2


class PlatformError(InputError):
    pass


class InventoryError(InputError):
    pass


class ReferenceError_(InputError):
    pass


class ContextError(InputError):
    pass


class PlanError(FarmError):
    pass


class NodeError(FarmError):
    """The node, not the build, is at fault: the platform may be retried elsewhere."""

    def __init__(self, message: str, *, node: str, retryable: bool = False, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.node = node
        self.retryable = retryable  # a transient fault (connection refused, timeout): try again


class BuildError(FarmError):
    """The build failed on its own terms (a broken Dockerfile): retrying elsewhere won't help."""

    def __init__(self, message: str, *, log_tail: tuple[str, ...] = (), hint: str | None = None):
        super().__init__(message, hint=hint)
        self.log_tail = log_tail


class RegistryError(FarmError):
    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.request = request


class VerificationError(FarmError):
    pass


class BuildFailedError(FarmError):
    """Some platforms failed, so the index was not pushed; ``failures`` maps platform to error."""

    def __init__(self, failures: dict[str, FarmError]) -> None:
        names = ", ".join(failures)
        super().__init__(
            f"{len(failures)} platform(s) failed: {names}; nothing was tagged",
        )
        self.failures = failures


# --- farm serve (farm/serve/) -----------------------------------------------------------------


class ServerError(FarmError):
    """A ``farm serve`` refused a request (``status``: its HTTP status) or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class ServerBugError(ServerError):
    exit_code = 70  # as a bug in a local ``farm build`` exits (EX_SOFTWARE)
