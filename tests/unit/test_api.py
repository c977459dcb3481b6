"""The build API's values: options checked as they are made, outcomes and the exit codes they carry,
and errors that keep their class, fields and exit code through their JSON form."""

from __future__ import annotations

import pytest

from farm import errors
from farm.api import (
    BuildOptions,
    BuildResult,
    Cancelled,
    Failed,
    Partial,
    PlatformResult,
    Pushed,
    outcome_of,
)
from farm.errors import (
    BuildCancelledError,
    BuildFailedError,
    FarmError,
    InputError,
    ReferenceError_,
    ServerBugError,
    error_from_json,
)
from farm.platforms import parse_platform
from farm.registry.name import parse_reference

AMD64 = parse_platform("linux/amd64")


def result(missing: dict[str, str] | None = None) -> BuildResult:
    child = PlatformResult(AMD64, "n", "native", "sha256:" + "2" * 64, 1, "m", 1.0)
    return BuildResult(
        (parse_reference("r.example/a:1"),), "sha256:" + "1" * 64, "m", 1, (child,), missing or {}
    )


@pytest.mark.parametrize(
    ("ended", "kind", "state", "exit_code"),
    [
        (result(), Pushed, "succeeded", 0),
        (result({"linux/arm64": "no node"}), Partial, "partial", 3),
        (BuildFailedError({"linux/arm64": FarmError("x")}), Failed, "failed", 1),
        (InputError("bad"), Failed, "failed", 2),
        (ServerBugError("bug"), Failed, "failed", 70),
        (BuildCancelledError("cancelled by bob"), Cancelled, "cancelled", 130),
    ],
)
def test_each_outcome_carries_its_state_and_exit_code(
    ended: BuildResult | FarmError, kind: type, state: str, exit_code: int
) -> None:
    outcome = outcome_of(ended)
    assert type(outcome) is kind
    assert (outcome.state, outcome.exit_code) == (state, exit_code)


def test_options_refuse_a_tag_that_names_a_digest_or_does_not_parse() -> None:
    with pytest.raises(InputError, match="names a digest") as refused:
        BuildOptions(tags=("r.example/a@sha256:" + "1" * 64,), platforms=(AMD64,))
    assert refused.value.hint == "tag with NAME:TAG; farm computes the digest"
    with pytest.raises(ReferenceError_, match="invalid repository name"):
        BuildOptions(tags=("Upper/Case:1",), platforms=(AMD64,))
    options = BuildOptions(tags=("r.example/a:1", "r.example/a:latest"), platforms=(AMD64,))
    assert [str(tag) for tag in options.references()] == ["r.example/a:1", "r.example/a:latest"]


@pytest.mark.parametrize("name", [name for name in errors.__all__ if name.endswith(("Error", "Error_"))])
def test_every_error_class_comes_back_from_json_as_itself(name: str) -> None:
    cls = getattr(errors, name)
    error: FarmError
    if cls is errors.NodeError:
        error = cls("m", node="pi", hint="h")
    elif cls is errors.BuildFailedError:
        error = cls({"linux/amd64": errors.NodeError("m", node="pi")})
    else:
        error = cls("m", hint="h")
    back = error_from_json(error.to_json())
    assert type(back) is cls
    assert back.to_json() == error.to_json()
    assert back.to_json()["exit_code"] == cls.exit_code
