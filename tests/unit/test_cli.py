"""``farm build`` in-process, through click's ``CliRunner`` with an injected build function: what each
outcome prints and what it exits with, and the one policy for exception groups.

The injected function stands where ``farm.build.run_build`` (or its ``--server`` twin) would; all
the rest is the real CLI: option parsing, the context scan, progress, the summary, the error boundary.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from farm.api import (
    Assigned,
    Building,
    BuildRequest,
    BuildResult,
    EventSink,
    LogLine,
    PlatformResult,
    Verifying,
)
from farm.cli import Cli, Here, OnServer, cli
from farm.errors import (
    BuildCancelledError,
    BuildError,
    BuildFailedError,
    ContextError,
    NodeError,
    PlanError,
    ServerBugError,
)
from farm.platforms import parse_platform

AMD64, ARM64 = parse_platform("linux/amd64"), parse_platform("linux/arm64")
INDEX = "sha256:" + "1" * 64
CHILD = "sha256:" + "2" * 64

Builder = Callable[[BuildRequest, Here | OnServer, EventSink, Callable[[str], None]], BuildResult]


class Calls:
    """What the CLI handed to the build function."""

    def __init__(self) -> None:
        self.requests: list[BuildRequest] = []
        self.places: list[Here | OnServer] = []


@pytest.fixture
def context(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    root.mkdir()
    (root / "Dockerfile").write_text("FROM busybox\nCOPY hello /\n")
    (root / "hello").write_text("hello\n")
    return root


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text('nodes:\n  - name: "local"\n    local: true\n')
    return path


def farm_build(
    builder: Builder,
    context: Path,
    *extra: str,
    inventory: Path | None,
    debug: bool = False,
    calls: Calls | None = None,
    env: dict[str, str | None] | None = None,
) -> Result:
    """``farm [--debug] build -t reg.example/app:1 --platform linux/amd64,linux/arm64 … CONTEXT``,
    built by ``builder``."""
    calls = calls if calls is not None else Calls()

    async def run_build(
        request: BuildRequest, where: Here | OnServer, on_event: EventSink, on_note: Callable[[str], None]
    ) -> BuildResult:
        calls.requests.append(request)
        calls.places.append(where)
        await asyncio.sleep(0)
        return builder(request, where, on_event, on_note)

    nodes = (
        ["--inventory", str(inventory), "--state-dir", str(inventory.parent / "state")] if inventory else []
    )
    args = [
        *(["--debug"] if debug else []), "build", "-t", "reg.example/app:1",
        "--platform", "linux/amd64,linux/arm64", "--progress", "plain", *nodes, *extra, str(context),
    ]  # fmt: skip
    env = {"FARM_SERVER": None, "FARM_INVENTORY": None, **(env or {})}
    return CliRunner().invoke(cli, args, obj=Cli(run_build=run_build), env=env)


def result_for(request: BuildRequest, missing: dict[str, str] | None = None) -> BuildResult:
    built = [p for p in request.options.platforms if str(p) not in (missing or {})]
    return BuildResult(
        tags=tuple(request.options.references()),
        index_digest=INDEX,
        index_media_type="application/vnd.oci.image.index.v1+json",
        index_size=300,
        platforms=tuple(
            PlatformResult(
                p, "local", "native", CHILD, 500, "application/vnd.oci.image.manifest.v1+json", 1.0
            )
            for p in built
        ),
        missing=missing or {},
    )


def raising(error: BaseException) -> Builder:
    def build(request: BuildRequest, *_: object) -> BuildResult:
        raise error

    return build


# --- outcomes ---------------------------------------------------------------------------------------


def test_pushed_prints_the_summary_writes_the_metadata_and_exits_0(
    context: Path, inventory: Path, tmp_path: Path
) -> None:
    def build(request: BuildRequest, where: object, on_event: EventSink, on_note: object) -> BuildResult:
        on_event(Assigned(AMD64, "local", "native on local"))
        on_event(Building(AMD64, "local", "native"))
        on_event(LogLine(AMD64, "local", "STEP 1/2: FROM busybox"))
        on_event(Verifying(AMD64, "local", CHILD))
        return result_for(request)

    calls = Calls()
    metadata = tmp_path / "metadata.json"
    run = farm_build(build, context, "--metadata-file", str(metadata), inventory=inventory, calls=calls)
    assert run.exit_code == 0, run.output
    assert f"pushed reg.example/app:1@{INDEX}" in run.stdout
    assert "linux/arm64" in run.stdout
    assert "[linux/amd64 local] assigned: native on local" in run.stderr
    assert "[linux/amd64 local] building: native" in run.stderr
    assert "[linux/amd64 local] STEP 1/2: FROM busybox" in run.stderr
    assert f"[linux/amd64 local] verifying: {CHILD}" in run.stderr
    assert json.loads(metadata.read_text())["containerimage.digest"] == INDEX
    # The request carries the scanned context and the Dockerfile's text: nothing to read again.
    [request] = calls.requests
    assert request.dockerfile == "FROM busybox\nCOPY hello /\n"
    assert sorted(entry[0] for entry in request.context.entries) == ["Dockerfile", "hello"]
    assert request.options.platforms == (AMD64, ARM64)
    [where] = calls.places
    assert isinstance(where, Here)
    assert [spec.name for spec in where.inventory.nodes] == ["local"]


def test_partial_lists_what_is_missing_and_exits_3(context: Path, inventory: Path) -> None:
    def build(request: BuildRequest, *_: object) -> BuildResult:
        return result_for(request, missing={"linux/arm64": "no node could build it"})

    run = farm_build(build, context, "--allow-partial", inventory=inventory)
    assert run.exit_code == 3, run.output
    assert "MISSING" in run.stdout
    assert "no node could build it" in run.stdout
    assert f"pushed reg.example/app:1@{INDEX}" in run.stdout


def test_a_failed_platform_shows_its_log_and_hint_and_exits_1(context: Path, inventory: Path) -> None:
    failed = BuildFailedError(
        {"linux/arm64": BuildError("RUN exited with 3", log_tail=("no arm64 support",), hint="fix the RUN")}
    )
    run = farm_build(raising(failed), context, inventory=inventory)
    assert run.exit_code == 1, run.output
    assert "error: 1 platform(s) failed: linux/arm64; nothing was tagged" in run.stderr
    assert "  linux/arm64: RUN exited with 3" in run.stderr
    assert "    | no arm64 support" in run.stderr
    assert "    hint: fix the RUN" in run.stderr
    assert "Traceback" not in run.stderr
    assert "pushed" not in run.stdout


def test_bad_input_exits_2_before_anything_is_built(context: Path, inventory: Path) -> None:
    calls = Calls()
    never = raising(AssertionError("never built"))
    run = farm_build(never, context, "--build-arg", "=x", inventory=inventory, calls=calls)
    assert run.exit_code == 2, run.output
    assert "error: bad --build-arg '=x'" in run.stderr
    assert "hint: write KEY=VALUE" in run.stderr
    assert calls.requests == []


def test_a_context_error_of_the_build_exits_2(context: Path, inventory: Path) -> None:
    error = ContextError("build context /x changed", hint="build again")
    run = farm_build(raising(error), context, inventory=inventory)
    assert run.exit_code == 2, run.output
    assert "error: build context /x changed\nhint: build again\n" in run.stderr


def test_a_missing_dockerfile_is_bad_input(context: Path, inventory: Path) -> None:
    (context / "Dockerfile").unlink()
    calls = Calls()
    run = farm_build(raising(AssertionError("never built")), context, inventory=inventory, calls=calls)
    assert run.exit_code == 2, run.output
    assert f"Dockerfile {context / 'Dockerfile'} does not exist" in run.stderr
    assert calls.requests == []


def test_a_bug_exits_70_with_its_traceback(context: Path, inventory: Path) -> None:
    run = farm_build(raising(KeyError("mode")), context, inventory=inventory)
    assert run.exit_code == 70, run.output
    assert "Traceback" in run.stderr
    assert "KeyError: 'mode'" in run.stderr
    assert "farm: internal error (the traceback above is a bug; please report it)" in run.stderr


def test_a_build_cancelled_on_the_server_exits_130(context: Path, inventory: Path) -> None:
    cancelled = BuildCancelledError("build 0123abcd was cancelled by alice@ci")
    run = farm_build(raising(cancelled), context, inventory=inventory)
    assert run.exit_code == 130, run.output
    assert "error: build 0123abcd was cancelled by alice@ci" in run.stderr


def test_sigterm_stops_the_build_and_exits_130(context: Path, inventory: Path) -> None:
    stopped: list[str] = []

    async def run_build(request: BuildRequest, *_: object) -> BuildResult:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.append("cancelled")
            raise
        raise AssertionError("SIGTERM did not cancel the build")

    args = ["build", "-t", "reg.example/app:1", "--platform", "linux/amd64", "--inventory", str(inventory)]
    run = CliRunner().invoke(cli, [*args, str(context)], obj=Cli(run_build=run_build))
    assert run.exit_code == 130, run.output
    assert stopped == ["cancelled"]
    assert "farm: interrupted; remote builds were stopped and nothing was tagged" in run.stderr


# --- exception groups -------------------------------------------------------------------------------


def test_a_group_mixing_a_farm_error_and_a_bug_is_a_bug(context: Path, inventory: Path) -> None:
    group = ExceptionGroup(
        "unhandled errors in a TaskGroup", [NodeError("pi: lost", node="pi"), ValueError("oops")]
    )
    run = farm_build(raising(group), context, inventory=inventory)
    assert run.exit_code == 70, run.output
    assert "ValueError: oops" in run.stderr
    assert "NodeError" not in run.stderr, "without --debug, the bug alone is shown"
    assert "farm: internal error" in run.stderr


def test_debug_shows_the_whole_group_around_the_bug(context: Path, inventory: Path) -> None:
    inner = ExceptionGroup("inner", [TypeError("nested bug")])
    group = ExceptionGroup("unhandled errors in a TaskGroup", [PlanError("no node"), inner])
    run = farm_build(raising(group), context, inventory=inventory, debug=True)
    assert run.exit_code == 70, run.output
    assert "TypeError: nested bug" in run.stderr
    assert "farm.errors.PlanError: no node" in run.stderr


def test_a_group_of_farm_errors_exits_as_its_first(context: Path, inventory: Path) -> None:
    group = ExceptionGroup("errors", [ContextError("a file changed"), NodeError("pi: lost", node="pi")])
    run = farm_build(raising(group), context, inventory=inventory)
    assert run.exit_code == 2, run.output
    assert "error: a file changed" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_server_bug_exits_70_without_a_local_traceback(context: Path, inventory: Path) -> None:
    bug = ServerBugError("internal error in farm serve while running build 1", hint="see the server's log")
    run = farm_build(raising(bug), context, inventory=inventory)
    assert run.exit_code == 70, run.output
    assert "error: internal error in farm serve while running build 1" in run.stderr
    assert "Traceback" not in run.stderr


# --- where it builds ---------------------------------------------------------------------------------


def test_a_server_build_gets_the_same_request_and_where_the_server_is(context: Path) -> None:
    calls = Calls()
    server = ["--server", "http://127.0.0.1:9", "--server-token", "t0ken"]
    run = farm_build(
        lambda request, *_: result_for(request), context, *server, inventory=None, calls=calls,
        env={"FARM_SUBMITTER": "alice@ci"},
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    [where] = calls.places
    assert isinstance(where, OnServer)
    assert (where.server.url, where.server.token, where.server.submitter) == (
        "http://127.0.0.1:9",
        "t0ken",
        "alice@ci",
    )
    [request] = calls.requests
    assert request.dockerfile == "FROM busybox\nCOPY hello /\n"
    assert sorted(entry[0] for entry in request.context.entries) == ["Dockerfile", "hello"]


def test_an_inventory_with_a_server_is_bad_input(context: Path, inventory: Path) -> None:
    server = ["--server", "http://127.0.0.1:9", "--server-token", "t0ken"]
    run = farm_build(raising(AssertionError("never built")), context, *server, inventory=inventory)
    assert run.exit_code == 2, run.output
    assert "error: --inventory has no effect with --server" in run.stderr
