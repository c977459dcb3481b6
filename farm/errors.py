"""Every error a farm user can meet, in one tree, each with its exit code and its JSON form.

    FarmError                  exit 1 unless a subclass says otherwise
    ├── InputError             the user's input is wrong (exit 2)
    │   ├── PlatformError      an unknown or malformed platform
    │   ├── InventoryError     an inventory file that does not validate
    │   ├── ReferenceError_    an image reference or tag that does not parse
    │   └── ContextError       a missing context or Dockerfile, a bad .dockerignore
    ├── PlanError              no node can build what was asked
    ├── NodeError              a node failed (unreachable, agent died, agent bug): another node may do it
    ├── BuildError             the build itself failed: it would fail anywhere
    ├── RegistryError          the registry refused or could not be reached
    ├── VerificationError      a pushed image is not of the platform it claims
    ├── BuildFailedError       one or more platforms failed; nothing was tagged
    ├── BuildCancelledError    the build was stopped on request, here or on a server (exit 130)
    └── ServerError            a `farm serve` refused a request or could not be reached
        └── ServerBugError     the server hit a bug in farm (exit 70, as a local bug does)

Each carries a one-line ``message`` and an optional ``hint`` saying what to do next, and turns into
JSON (``to_json``) and back (``error_from_json``) as the very class it is, so a build on ``farm
serve`` fails on its client with the error, the message and the exit code a local build has. Only
the CLI turns errors into text and exit codes; exit codes as farm uses them:

    0  pushed                     3    pushed without some platforms (--allow-partial)
    1  failed, nothing tagged     70   a bug in farm (EXIT_BUG; an error that is no FarmError)
    2  bad input                  130  cancelled or interrupted (EXIT_CANCELLED)
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "EXIT_BUG",
    "EXIT_CANCELLED",
    "BuildCancelledError",
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
    "bug_in",
    "error_from_json",
    "error_leaves",
]

EXIT_BUG = 70  # EX_SOFTWARE: farm itself failed
EXIT_CANCELLED = 130  # as a shell reports a command ended by Ctrl-C (128 + SIGINT)

JSON = dict[str, Any]
_CLASSES: dict[str, type[FarmError]] = {}  # every FarmError class by name, for ``error_from_json``


class FarmError(Exception):
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CLASSES[cls.__name__] = cls

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> JSON:
        """The error as ``farm serve`` sends it and keeps it in its history."""
        return {
            "class": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
            **self._fields_to_json(),
        }

    def _fields_to_json(self) -> JSON:
        """The fields a subclass adds to the message and the hint."""
        return {}

    @classmethod
    def _from_json(cls, message: str, hint: str | None, document: JSON) -> FarmError:
        return cls(message, hint=hint)


_CLASSES[FarmError.__name__] = FarmError  # its subclasses register themselves


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

    def _fields_to_json(self) -> JSON:
        return {"node": self.node, "retryable": self.retryable}

    @classmethod
    def _from_json(cls, message: str, hint: str | None, document: JSON) -> FarmError:
        return cls(
            message, node=str(document.get("node", "")), retryable=bool(document.get("retryable")), hint=hint
        )


class BuildError(FarmError):
    """The build failed on its own terms (a broken Dockerfile): retrying elsewhere won't help."""

    def __init__(self, message: str, *, log_tail: tuple[str, ...] = (), hint: str | None = None):
        super().__init__(message, hint=hint)
        self.log_tail = log_tail

    def _fields_to_json(self) -> JSON:
        return {"log_tail": list(self.log_tail)}

    @classmethod
    def _from_json(cls, message: str, hint: str | None, document: JSON) -> FarmError:
        return cls(message, log_tail=tuple(str(line) for line in document.get("log_tail") or ()), hint=hint)


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

    def _fields_to_json(self) -> JSON:
        return {"status": self.status, "request": self.request}

    @classmethod
    def _from_json(cls, message: str, hint: str | None, document: JSON) -> FarmError:
        request = document.get("request")
        return cls(
            message,
            status=_int_or_none(document.get("status")),
            request=str(request) if request is not None else None,
            hint=hint,
        )


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

    def _fields_to_json(self) -> JSON:
        return {"failures": {platform: failure.to_json() for platform, failure in self.failures.items()}}

    @classmethod
    def _from_json(cls, message: str, hint: str | None, document: JSON) -> FarmError:
        failures = document.get("failures") or {}
        return cls({str(platform): error_from_json(failure) for platform, failure in failures.items()})


class BuildCancelledError(FarmError):
    """The build was stopped on request before anything was tagged: by Ctrl-C or SIGTERM here, or by
    a client of the ``farm serve`` that ran it (every client following it exits as cancelled)."""

    exit_code = EXIT_CANCELLED


# --- farm serve (farm/serve/) -----------------------------------------------------------------


class ServerError(FarmError):
    """A ``farm serve`` refused a request (``status``: its HTTP status) or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status

    def _fields_to_json(self) -> JSON:
        return {"status": self.status}

    @classmethod
    def _from_json(cls, message: str, hint: str | None, document: JSON) -> FarmError:
        return cls(message, status=_int_or_none(document.get("status")), hint=hint)


class ServerBugError(ServerError):
    exit_code = EXIT_BUG  # as a bug in a local ``farm build`` exits


def error_from_json(document: JSON) -> FarmError:
    """The error ``document`` (``FarmError.to_json``) describes, as the class it was raised as where
    this farm knows it; else as the class its exit code says, carrying its message."""
    name = str(document.get("class", ""))
    message = str(document.get("message", "the server reported an error without a message"))
    hint = document.get("hint")
    hint = str(hint) if hint is not None else None
    known = _CLASSES.get(name)
    if known is not None:
        return known._from_json(message, hint, document)
    exit_code = document.get("exit_code")
    if exit_code == EXIT_BUG:
        return ServerBugError(message, status=_int_or_none(document.get("status")), hint=hint)
    if exit_code == EXIT_CANCELLED:
        return BuildCancelledError(message, hint=hint)
    if exit_code == InputError.exit_code:
        return InputError(message, hint=hint)
    return ServerError(message, status=_int_or_none(document.get("status")), hint=hint)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- exception groups -------------------------------------------------------------------------
#
# One policy wherever a build's end is recorded (the CLI, farm serve): an error that is no FarmError
# anywhere in a group is a bug, and the bug is what is reported; else the first FarmError.


def error_leaves(error: BaseException) -> list[BaseException]:
    """The exceptions an exception group holds, however nested; any other exception, alone."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in error_leaves(inner)]
    return [error]


def bug_in(error: BaseException) -> Exception | None:
    """The first error in ``error`` (a group or not) that is no FarmError: a bug in farm. Exceptions
    that are not ``Exception``s (KeyboardInterrupt, asyncio's CancelledError) are no bugs."""
    for leaf in error_leaves(error):
        if isinstance(leaf, Exception) and not isinstance(leaf, FarmError):
            return leaf
    return None
