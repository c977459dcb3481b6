"""farm serve in-process, without nodes: how a build's end is recorded (one exit code for the history
and for every client following it), and the context a build takes straight from the store."""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import canonical_manifest, encode, manifest_digest
from farm.api import BuildOptions
from farm.errors import (
    BuildCancelledError,
    FarmError,
    NodeError,
    PlanError,
    ServerBugError,
    error_from_json,
)
from farm.inventory import Inventory, NodeSpec
from farm.platforms import parse_platform
from farm.serve.coordinator import Coordinator, CoordinatorOptions, Job
from farm.serve.registries import RegistryPolicy
from farm.serve.state import open_state

FILES = {"Dockerfile": b"FROM reg.example/busybox\n", "hello": b"hello\n"}
BLOBS = {"sha256:" + hashlib.sha256(data).hexdigest(): data for data in FILES.values()}
ENTRIES = [
    (name, stat.S_IFREG | 0o644, len(data), "sha256:" + hashlib.sha256(data).hexdigest(), "")
    for name, data in FILES.items()
]
CONTEXT = manifest_digest(canonical_manifest(ENTRIES))
OPTIONS = BuildOptions(tags=("reg.example/app:1",), platforms=(parse_platform("linux/amd64"),))


def coordinator(state_dir: Path) -> Coordinator:
    inventory = Inventory(nodes=(NodeSpec(name="local", local=True),))
    policy = RegistryPolicy(frozenset({"reg.example"}))
    return Coordinator(inventory, open_state(state_dir), CoordinatorOptions(), "test", policy)


async def upload(server: Coordinator) -> None:
    """The context, as ``farm build --server`` sends it."""
    body = json.dumps({"context": CONTEXT, "entries": [list(entry) for entry in ENTRIES]}).encode()
    missing, _, _ = server.contexts.accept_sync(body)
    stream = asyncio.StreamReader()
    for digest in missing:
        stream.feed_data(encode("blob", digest=digest, size=len(BLOBS[digest])) + BLOBS[digest])
    stream.feed_eof()
    await server.contexts.receive(CONTEXT, stream)


async def final_error(server: Coordinator, build_id: str) -> FarmError:
    """The error the last line of the build's event stream carries, as the client raises it."""
    lines: AsyncIterator[dict[str, Any] | None] = server.follow(build_id)
    last = None
    async for line in lines:
        last = line
    assert last is not None
    assert last["type"] == "error"
    return error_from_json(last["error"])


def test_a_build_cancelled_by_another_client_exits_130_for_every_client_and_in_the_history(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        server = coordinator(tmp_path / "state")
        try:
            await upload(server)
            job = await server.submit(
                "alice@ci", CONTEXT, OPTIONS.model_dump(mode="json"), FILES["Dockerfile"].decode()
            )
            status = await server.cancel(job.id, "bob@laptop")
            assert (status["state"], status["exit_code"]) == ("cancelled", 130)
            # The client following it raises what a cancelled build raises: it exits 130.
            error = await final_error(server, job.id)
            assert isinstance(error, BuildCancelledError)
            assert error.exit_code == 130
            assert error.message == f"build {job.id} was cancelled by bob@laptop before it ran"
            row = server.history.get(job.id)
            assert row is not None
            assert (row.state, row.exit_code) == ("cancelled", 130)
            assert row.error_json == error.to_json()
            # Once it has left the server's memory, it is told from the history: the same.
            server.jobs.clear()
            assert (await final_error(server, job.id)).to_json() == error.to_json()
        finally:
            server.state.close()

    asyncio.run(scenario())


def test_a_build_takes_its_context_from_the_store_as_the_client_scanned_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = coordinator(tmp_path / "state")
        try:
            await upload(server)
            async with server.contexts.context(CONTEXT) as context:
                assert context.digest == CONTEXT
                assert list(context.entries) == ENTRIES
                for digest, data in BLOBS.items():
                    assert context.read_blob(digest) == data
                    assert Path(context.blobs[digest]).is_relative_to(tmp_path / "state" / "store")
            assert not (tmp_path / "state" / "layouts").exists()
        finally:
            server.state.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("raised", "recorded"),
    [
        (PlanError("no node"), PlanError),
        (ExceptionGroup("g", [NodeError("a", node="a"), PlanError("no node")]), NodeError),
        (ExceptionGroup("g", [NodeError("a", node="a"), KeyError("mode")]), ServerBugError),
        (ExceptionGroup("g", [ExceptionGroup("inner", [ValueError("x")]), PlanError("p")]), ServerBugError),
        (TypeError("bug"), ServerBugError),
    ],
)
def test_a_bug_anywhere_in_a_build_s_error_makes_it_a_bug(
    raised: Exception, recorded: type[FarmError]
) -> None:
    job = Job("0123", "ci", {}, CONTEXT, "", [], [], 0.0, 0.0)
    error = Coordinator._as_farm_error(job, raised)
    assert type(error) is recorded
    assert error.exit_code == (70 if recorded is ServerBugError else recorded.exit_code)


def test_an_older_servers_layouts_are_removed_at_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    frozen = state / "layouts" / "sha256-abc" / "src"
    frozen.mkdir(parents=True)
    (frozen / "file").write_text("x")
    frozen.chmod(0o500)
    (state / "work").mkdir()
    (state / "work" / "0123.Dockerfile").write_text("FROM x\n")
    open_state(state).close()
    assert not (state / "layouts").exists()
    assert not (state / "work").exists()
