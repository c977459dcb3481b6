"""farm serve's pure parts: the fair queue, the wire format, and the history's restart rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.api import (
    Assigned,
    Building,
    BuildResult,
    ContextSync,
    LogLine,
    PlatformFailed,
    PlatformResult,
    Retrying,
    Reused,
    Syncing,
    Verifying,
    Waiting,
)
from farm.errors import (
    BuildCancelledError,
    BuildError,
    BuildFailedError,
    ContextError,
    FarmError,
    NodeError,
    RegistryError,
    ServerBugError,
    ServerError,
)
from farm.platforms import parse_platform
from farm.registry.name import parse_reference
from farm.scheduler import Assign, Fail, Wait
from farm.serve.history import INTERRUPTED_QUEUED, INTERRUPTED_RUNNING, History, PlatformRow
from farm.serve.queue import FairQueue
from farm.serve.wire import (
    decision_from_json,
    decision_to_json,
    error_from_json,
    error_to_json,
    event_from_json,
    event_to_json,
    result_from_json,
    result_to_json,
)

# --- the queue ----------------------------------------------------------------------------------


def drain(queue: FairQueue) -> list[str]:
    out = []
    while (item := queue.pop()) is not None:
        out.append(item)
    return out


def test_the_queue_serves_submitters_in_turn_and_each_in_order() -> None:
    queue = FairQueue()
    for n in range(4):
        queue.push("ci", f"ci{n}")
    queue.push("alice", "a0")
    queue.push("bob", "b0")
    queue.push("alice", "a1")
    assert queue.items() == ["ci0", "a0", "b0", "ci1", "a1", "ci2", "ci3"]
    assert [queue.position(item) for item in queue.items()] == list(range(7))
    assert drain(queue) == ["ci0", "a0", "b0", "ci1", "a1", "ci2", "ci3"]
    assert len(queue) == 0
    assert queue.pop() is None


def test_a_newcomer_waits_for_one_build_of_each_other_submitter_at_most() -> None:
    queue = FairQueue()
    for n in range(50):
        queue.push("ci", f"ci{n}")
    assert queue.pop() == "ci0"  # running
    queue.push("alice", "a0")
    assert queue.position("a0") == 1
    assert queue.pop() == "ci1"
    assert queue.pop() == "a0"


def test_removing_a_build_keeps_the_rest_in_order() -> None:
    queue = FairQueue()
    for item in ("a0", "a1", "a2"):
        queue.push("a", item)
    queue.push("b", "b0")
    assert queue.remove("a1")
    assert not queue.remove("a1")
    assert queue.remove("b0")
    assert "b0" not in queue
    assert drain(queue) == ["a0", "a2"]
    with pytest.raises(KeyError):
        queue.position("a0")


def test_an_id_is_queued_once() -> None:
    queue = FairQueue()
    queue.push("a", "x")
    with pytest.raises(ValueError, match="queued already"):
        queue.push("b", "x")


# --- the wire -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ContextError("build context /x does not exist", hint="pass the folder"),
        NodeError("pi4: lost", node="pi4", retryable=True),
        BuildError("RUN failed", log_tail=("a", "b")),
        RegistryError("denied", status=401, request="PUT /v2/x"),
        ServerError("gone", status=503),
        ServerBugError("bug"),
        BuildCancelledError("build 1 was cancelled by bob"),
        BuildFailedError(
            {"linux/arm64": BuildError("exit 7", log_tail=("x",)), "linux/amd64": NodeError("n", node="a")}
        ),
    ],
)
def test_errors_cross_the_wire_as_the_class_they_are(error: FarmError) -> None:
    back = error_from_json(error_to_json(error))
    assert type(back) is type(error)
    assert back.message == error.message
    assert back.hint == error.hint
    assert back.exit_code == error.exit_code
    assert error_to_json(back) == error_to_json(error)


def test_an_unknown_error_class_keeps_its_message_and_exit_code() -> None:
    assert type(error_from_json({"class": "NewError", "message": "m", "exit_code": 2})).exit_code == 2
    assert isinstance(
        error_from_json({"class": "Stopped", "message": "m", "exit_code": 130}), BuildCancelledError
    )
    assert isinstance(error_from_json({"class": "Crash", "message": "m", "exit_code": 70}), ServerBugError)
    unknown = error_from_json({"class": "Other", "message": "m", "exit_code": 1})
    assert isinstance(unknown, ServerError)
    assert unknown.message == "m"


def test_results_events_and_decisions_round_trip() -> None:
    arm64 = parse_platform("linux/arm64")
    result = BuildResult(
        tags=(parse_reference("reg:5000/a/b:1"),),
        index_digest="sha256:" + "1" * 64,
        index_media_type="application/vnd.oci.image.index.v1+json",
        index_size=500,
        platforms=(PlatformResult(arm64, "pi", "native", "sha256:" + "2" * 64, 10, "m", 1.5, reused=True),),
        missing={"linux/s390x": "no node"},
    )
    assert result_from_json(result_to_json(result)) == result
    for event in (
        Waiting(arm64, "-", "every native slot is taken"),
        Assigned(arm64, "pi", "native on pi"),
        Syncing(arm64, "pi", 3, 300),
        Syncing(arm64, "pi", 3, 300, ContextSync(300, 1, 100)),
        Building(arm64, "pi", "native"),
        LogLine(arm64, "pi", "STEP 1/2: FROM busybox"),
        Verifying(arm64, "pi", "sha256:" + "2" * 64),
        Reused(arm64, "pi", "sha256:" + "2" * 64),
        Retrying(arm64, "pi", "lost the agent on pi; trying another node"),
        PlatformFailed(arm64, "pi", "RUN failed"),
    ):
        assert event_from_json(event_to_json(event)) == event
    for decision in (
        Assign(arm64, "pi", "emulated", "why"),
        Wait(arm64, "waiting", None),
        Fail(arm64, "no", "hint"),
    ):
        assert decision_from_json(decision_to_json(decision)) == decision


# --- the history's restart rule -----------------------------------------------------------------


def test_builds_left_unfinished_are_marked_failed_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    history = History.open(path)
    for build_id in ("done", "running", "queued"):
        history.add(
            build_id,
            submitter="ci",
            tags=["r/x:1"],
            platforms=["linux/amd64", "linux/arm64"],
            options={},
            context="sha256:c",
            submitted_at=1.0,
        )
    history.start("done", 2.0)
    history.finish(
        "done",
        state="succeeded",
        ended_at=3.0,
        exit_code=0,
        platforms=[PlatformRow("linux/amd64", "n", "native", 1.0, "sha256:d", "success")],
    )
    history.start("running", 2.0)
    history.platform_started("running", "linux/arm64", "pi", "native")
    history.close()  # as a SIGKILL leaves it: no more writes

    reopened = History.open(path)
    assert sorted(reopened.recover(now=9.0)) == ["queued", "running"]
    running = reopened.get("running")
    assert running is not None
    assert (running.state, running.error, running.exit_code, running.ended_at) == (
        "failed",
        INTERRUPTED_RUNNING,
        1,
        9.0,
    )
    assert [(r.platform, r.node, r.mode, r.result) for r in running.platform_rows] == [
        ("linux/arm64", "pi", "native", "failure"),
        ("linux/amd64", None, None, "failure"),
    ]
    queued = reopened.get("queued")
    assert queued is not None
    assert (queued.state, queued.error) == ("failed", INTERRUPTED_QUEUED)
    done = reopened.get("done")
    assert done is not None
    assert done.state == "succeeded"
    assert [row.id for row in reopened.recent()] == ["queued", "running", "done"]
    assert reopened.recover(now=10.0) == []


def test_events_of_a_server_older_than_typed_events_are_read_from_their_detail() -> None:
    arm64 = parse_platform("linux/arm64")

    def old(state: str, detail: str) -> dict[str, str]:
        return {"platform": "linux/arm64", "node": "pi", "state": state, "detail": detail}

    assert event_from_json(old("building", "emulated")) == Building(arm64, "pi", "emulated")
    assert event_from_json(old("log", "STEP 2/2")) == LogLine(arm64, "pi", "STEP 2/2")
    assert event_from_json(old("failed", "RUN failed")) == PlatformFailed(arm64, "pi", "RUN failed")
    # What this client cannot read is skipped (progress only): the stream's last line still counts.
    assert event_from_json(old("syncing", "3 entries, 300 bytes")) is None
    assert event_from_json(old("teleporting", "")) is None
    assert event_from_json(old("building", "interpreted")) is None
    assert event_from_json({"platform": "linux/sparc", "state": "log", "line": "x"}) is None
