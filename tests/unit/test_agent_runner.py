"""How the agent runs builder commands: tied to the agent (a killed agent leaves none behind),
cancellable as a whole process group, their ends reported as they happened; the private network
helper; the store tidied without starting the builder when there is nothing to tidy; the blob
cache an export reuses the base image's blobs from, and what of it is kept."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent import builders
from agent.builders import (
    _IF_PARENT,
    _PRIVATE_NETWORK,
    BuilderFailed,
    BuildSpec,
    Cancelled,
    Runner,
    _contained,
    _drop_uncompressed_copies,
    _prune_blob_cache,
    _setpriv,
    export_image,
    tidy_store,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["setpriv", "python guard"])
def tie(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test once with setpriv tying commands to the agent, once with the Python guard it falls
    back to where setpriv cannot."""
    if request.param == "setpriv":
        # util-linux's setpriv (2.33 and newer) is on every machine the lab sets up.
        assert _setpriv() is not None, "setpriv cannot set --pdeathsig here"
    else:
        monkeypatch.setattr(builders, "_setpriv_probe", [None])
    return str(request.param)


def ended(pid: int) -> bool:
    """Gone, or a zombie no one has reaped yet (its parent died: it is init's now)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for(check: object, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


# An agent of its own: a process that runs one command through a Runner and prints its pid.
_AGENT = """
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from agent import builders
if sys.argv[2] == "python guard":
    builders._setpriv_probe[:] = [None]
runner = builders.Runner(lambda line: None)
threading.Thread(target=runner.run, args=(sys.argv[3:],), daemon=True).start()
while runner._process is None:
    time.sleep(0.01)
print(runner._process.pid, flush=True)
time.sleep(600)
"""


def test_a_command_ends_when_its_agent_is_killed(tie: str) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", _AGENT, str(REPO), tie, "sleep", "600"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert agent.stdout is not None
        command = int(agent.stdout.readline())
        # The command is running (setpriv and sh exec'd it; the guard started it).
        assert wait_for(lambda: any(p.name == "sleep" for p in _tree(command)))
        sleeps = [p.pid for p in _tree(command) if p.name == "sleep"]
        agent.kill()  # SIGKILL: no goodbye, no cleanup of its own
        agent.wait()
        assert wait_for(lambda: all(ended(pid) for pid in [command, *sleeps])), (
            "the command outlived its agent"
        )
    finally:
        agent.kill()
        agent.wait()


def test_a_command_whose_agent_died_before_it_was_tied_does_not_run(tmp_path: Path) -> None:
    """The kernel's parent-death signal is set in the child: an agent that died before that
    (its child then has another parent) sends none. The child sees it and does not start."""
    setpriv = _setpriv()
    assert setpriv is not None
    ran = tmp_path / "ran"
    tied = [setpriv, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _IF_PARENT]
    elsewhere = subprocess.run([*tied, "1", "touch", str(ran)])  # "the agent" is pid 1, not us
    assert elsewhere.returncode != 0
    assert not ran.exists()
    here = subprocess.run([*tied, str(os.getpid()), "touch", str(ran)])
    assert here.returncode == 0
    assert ran.exists()


def test_output_and_exit_status_come_back_as_the_command_gave_them(tie: str) -> None:
    lines: list[str] = []
    runner = Runner(lines.append)
    assert runner.run(["sh", "-c", "echo one; echo two >&2"]) == "one\ntwo"
    assert lines == ["one", "two"]
    with pytest.raises(BuilderFailed, match="sh exited with status 3") as failed:
        runner.run(["sh", "-c", "echo three; exit 3"], quiet=True)
    assert not failed.value.signalled
    assert failed.value.tail[-1] == "three"
    assert lines == ["one", "two"]  # quiet: remembered, not streamed


def test_a_command_killed_by_a_signal_is_reported_as_such(tie: str) -> None:
    with pytest.raises(BuilderFailed) as failed:
        Runner(lambda line: None).run(["sh", "-c", "kill -KILL $$"])
    assert failed.value.signalled
    assert failed.value.node_at_fault


def test_cancelling_kills_the_whole_process_group(tie: str, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    runner = Runner(lambda line: None)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            runner.run(["sh", "-c", f"sleep 600 & echo $! >{pids}; sleep 600"])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_for(lambda: pids.exists() and pids.read_text().strip())
    background = int(pids.read_text())
    runner.cancel()
    thread.join(30)
    assert not thread.is_alive()
    assert [type(error) for error in errors] == [Cancelled]
    assert wait_for(lambda: ended(background))
    with pytest.raises(Cancelled):
        runner.run(["true"])


class _Process:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            self.name = ""


def _tree(root: int) -> list[_Process]:
    """``root`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(_Process(pid))
        todo += children.get(pid, [])
    return found


# --- the private network helper, with stand-ins for unshare, sleep and slirp4netns ----------------


@pytest.fixture
def stand_ins(tmp_path: Path) -> Path:
    """A PATH folder: ``unshare`` runs what follows ``--`` (no namespace), ``sleep`` returns at once
    (the holder; nothing would end it outside a PID namespace), ``slirp4netns`` notes its arguments
    and says it is ready on its ready descriptor."""
    folder = tmp_path / "bin"
    folder.mkdir()
    scripts = {
        "unshare": 'while [ "$1" != -- ]; do shift; done; shift; exec "$@"',
        "sleep": "exit 0",
        "slirp4netns": f'echo "$@" >{tmp_path}/slirp-args; printf 1 >&3',
        "slirp-fails": "echo 'slirp4netns: cannot join' >&2; exit 1",
    }
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def private_network(stand_ins: Path, slirp: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", _PRIVATE_NETWORK, "farm-network", str(stand_ins / slirp), *command],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PATH": f"{stand_ins}:{os.environ['PATH']}"},
    )


def test_the_builder_gets_the_namespace_slirp4netns_was_given(stand_ins: Path) -> None:
    done = private_network(
        stand_ins, "slirp4netns", "sh", "-c", 'printf "%s|" "$@"', "x", "--network", "ns:@FARM-NETNS@", "a b"
    )
    assert done.returncode == 0, done.stderr
    args = (stand_ins.parent / "slirp-args").read_text().split()
    assert args[:4] == ["--configure", "--mtu=65520", "--disable-host-loopback", "--ready-fd=3"]
    holder = args[4]
    assert holder.isdigit()
    assert args[5] == "tap0"
    assert done.stdout == f"--network|ns:/proc/{holder}/ns/net|a b|"


def test_the_builder_s_exit_status_is_the_helper_s(stand_ins: Path) -> None:
    assert private_network(stand_ins, "slirp4netns", "sh", "-c", "exit 7").returncode == 7


def test_a_network_that_cannot_be_made_stops_the_build_before_it_starts(stand_ins: Path) -> None:
    failed = private_network(stand_ins, "slirp-fails", "touch", str(stand_ins / "built"))
    assert failed.returncode == 125
    assert "slirp4netns could not give the build its network" in failed.stderr
    assert not (stand_ins / "built").exists()
    (stand_ins / "unshare").write_text("#!/bin/sh\nexit 1\n")
    failed = private_network(stand_ins, "slirp4netns", "touch", str(stand_ins / "built"))
    assert failed.returncode == 125
    assert "cannot create the build's network namespace" in failed.stderr
    assert not (stand_ins / "built").exists()


def test_rootless_the_pid_namespace_is_tied_to_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(builders, "_setpriv_probe", ["/usr/bin/setpriv"])
    command = _contained(["buildah"], ["buildah", "bud"], private_network=False)
    assert command[:8] == [
        "buildah",
        "unshare",
        "--",
        "/usr/bin/setpriv",
        "--pdeathsig",
        "KILL",
        "--",
        "unshare",
    ]
    assert "--kill-child" in command
    # Without setpriv the guard kills the whole process group, this command included.
    monkeypatch.setattr(builders, "_setpriv_probe", [None])
    assert _contained(["buildah"], ["buildah", "bud"], private_network=False)[:4] == [
        "buildah", "unshare", "--", "unshare",
    ]  # fmt: skip


# --- the store: tidied without the builder, and the blob cache ------------------------------------


class Recording(Runner):
    def __init__(self, answer: str = "") -> None:
        super().__init__(lambda line: None)
        self.commands: list[list[str]] = []
        self.answer = answer

    def run(self, argv: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> str:
        self.commands.append(argv)
        if "--iidfile" in argv:
            Path(argv[argv.index("--iidfile") + 1]).write_text("sha256:" + "a" * 64)
        return self.answer


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "driver").write_text("vfs")  # no overlay probe
    return tmp_path


def subcommands(runner: Recording) -> list[str]:
    return [argv[argv.index("--storage-driver") + 2] for argv in runner.commands]


@pytest.mark.parametrize(
    ("listing", "tidied"),
    [(None, False), ("[]", False), ("null", False), ('[{"id": "c1"}]', True), ("[{", True)],
)
def test_the_builder_is_asked_about_containers_only_when_the_store_lists_some(
    workdir: Path, listing: str | None, tidied: bool
) -> None:
    if listing is not None:
        folder = workdir / "storage" / "buildah-vfs" / "root" / "vfs-containers"
        folder.mkdir(parents=True)
        (folder / "containers.json").write_text(listing)
    runner = Recording(answer="c1")
    tidy_store("buildah", str(workdir), runner, min_free=0)
    assert subcommands(runner) == (["containers", "rm"] if tidied else [])


def test_volatile_containers_count_too(workdir: Path) -> None:
    folder = workdir / "storage" / "podman-vfs" / "run" / "vfs-containers"
    folder.mkdir(parents=True)
    (folder / "volatile-containers.json").write_text(json.dumps([{"id": "c1"}]))
    runner = Recording()
    tidy_store("podman", str(workdir), runner, min_free=0)
    assert subcommands(runner) == ["ps"]


def test_a_short_disk_drops_the_images_and_the_blob_cache(workdir: Path) -> None:
    cache = workdir / "storage" / "buildah-vfs" / "blob-cache"
    cache.mkdir(parents=True)
    (cache / ("sha256:" + "1" * 64)).write_text("blob")
    runner = Recording()
    tidy_store("buildah", str(workdir), runner, min_free=shutil.disk_usage(workdir).total + 1)
    assert subcommands(runner) == ["rmi"]
    assert not cache.exists()


def test_the_blob_cache_keeps_what_an_export_reuses(workdir: Path) -> None:
    cache = workdir / "storage" / "buildah-vfs" / "blob-cache"
    cache.mkdir(parents=True)
    pulled, twin, committed, config = ("sha256:" + c * 64 for c in "1234")
    kept = [pulled, pulled + ".decompressed", twin + ".compressed", "something-else"]
    dropped = [twin, committed, config + ".config", twin + "123456"]  # the last: a temporary file
    for name in kept + dropped:
        (cache / name).write_text(name)
    tidy_store("buildah", str(workdir), Recording(), min_free=0)
    assert sorted(os.listdir(cache)) == sorted(kept)
    _prune_blob_cache(str(workdir / "nothing-here"))  # no cache yet: nothing to do


def test_an_export_drops_the_uncompressed_copies_of_its_layers_from_the_blob_cache(tmp_path: Path) -> None:
    layout = tmp_path / "image"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    base, own, other = ("sha256:" + c * 64 for c in "abc")
    compressed = "sha256:" + "d" * 64

    def store(document: object) -> str:
        raw = json.dumps(document).encode()
        digest = hashlib.sha256(raw).hexdigest()
        (blobs / digest).write_bytes(raw)
        return "sha256:" + digest

    config = store({"rootfs": {"type": "layers", "diff_ids": [base, own]}})
    manifest = store({"config": {"digest": config}, "layers": []})
    (layout / "index.json").write_text(json.dumps({"manifests": [{"digest": manifest}]}))
    cache = tmp_path / "cache"
    cache.mkdir()
    names = [base, base + ".compressed", compressed, compressed + ".decompressed", own, other]
    for name in names:
        (cache / name).write_text(name)
    _drop_uncompressed_copies(str(cache), str(layout))
    assert sorted(os.listdir(cache)) == sorted(set(names) - {base, own})
    (layout / "index.json").write_text("{}")
    _drop_uncompressed_copies(str(cache), str(layout))  # a layout it cannot read: left to the upload


@pytest.mark.parametrize(("builder", "cached"), [("buildah", True), ("podman", False)])
def test_build_and_export_go_through_the_blob_cache_with_buildah(
    workdir: Path, builder: str, cached: bool
) -> None:
    build_dir = workdir / "builds" / "b1"
    build_dir.mkdir(parents=True)
    spec = BuildSpec(
        builder=builder, workdir=str(workdir), build_dir=str(build_dir), platform="linux/amd64",
        dockerfile="FROM scratch\n", build_args={}, target="", insecure_registries=[], isolation="chroot",
    )  # fmt: skip
    runner = Recording()
    export_image(spec, runner)
    build, push = runner.commands
    cache = str(workdir / "storage" / f"{builder}-vfs" / "blob-cache")
    for argv in (build, push):
        assert (argv[argv.index("--blob-cache") + 1] == cache) if cached else ("--blob-cache" not in argv)
    assert push[-1] == "oci:" + str(build_dir / "image")


def test_no_process_stays_between_the_agent_and_its_command() -> None:
    """setpriv and sh exec the command: the process the agent waits on, and signals, is its own."""
    runner = Runner(lambda line: None)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            runner.run(["sleep", "600"])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_for(lambda: runner._process is not None)
    process = runner._process
    assert process is not None
    assert wait_for(lambda: Path(f"/proc/{process.pid}/comm").read_text().strip() == "sleep")
    assert [p.pid for p in _tree(process.pid)] == [process.pid]
    runner.cancel()
    thread.join(30)
    assert [type(error) for error in errors] == [Cancelled]
