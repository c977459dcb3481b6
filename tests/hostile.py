"""Hostile builds: a static probe (``tests/hostile/probe.c``) run as a Dockerfile RUN step, what the
tests aim it at, and how they read its verdicts.

The probe prints one ``FARM-PROBE <attack> blocked|SUCCEEDED <detail>`` line per attack (see the
comment at the top of probe.c); a contained build prints ``blocked`` for all of ``ATTACKS``.

What the tests assume of a node (the places to change if the agent's layout changes):

* ``agent_cache_dirs``: where a node keeps the agent zipapp it runs (``farm-agent-*.pyz``);
* ``context_globs``: where a node lays out a build's context while it builds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests import lab

__all__ = [
    "ATTACKS",
    "Aim",
    "Watch",
    "agent_cache_dirs",
    "assert_contained",
    "canary_file",
    "canary_process",
    "compile_probe",
    "context_globs",
    "docker_config",
    "gate_probes",
    "hostile_context",
    "probe_lines",
    "verdicts",
]

PROBE_SOURCE = Path(__file__).resolve().parent / "hostile" / "probe.c"
ATTACKS = frozenset(
    {"host-procs", "loopback", "proc-root", "chroot-escape", "read-files", "write-agent-cache"}
)
_VERDICT = re.compile(r"FARM-PROBE (\S+) (blocked|SUCCEEDED) (.*)$")
_WRITTEN = "farm-probe-write-*"  # what the probe creates in a folder it can write to


def compile_probe(folder: Path) -> Path:
    """The probe, linked statically (it runs in a busybox image with no libc of its own)."""
    probe = folder / "probe"
    lab.run(["gcc", "-std=c99", "-static", "-O1", "-Wall", "-Wextra", "-o", str(probe), str(PROBE_SOURCE)])
    return probe


def agent_cache_dirs(home: Path, workdir: Path) -> list[Path]:
    """Where a node may keep its cached agent zipapp: the coordinator's cache folder for the local
    node (``farm.paths.CACHE_DIR`` under ``home``), the node's workdir for SSH nodes."""
    return [home / ".cache" / "farm" / "agent", workdir / "agent"]


def context_globs(workdir: Path, name: str) -> list[str]:
    """Where a node lays out the context file ``name`` of a build it is running."""
    return [f"{workdir}/builds/*/context/{name}"]


@dataclass
class Aim:
    """What one probe attacks: the command line of its RUN step."""

    nonce: str  # the probe's label: how the test finds its process on the host
    secrets: list[str] = field(default_factory=list)  # looked for in every process's environ/cmdline
    canaries: list[str] = field(default_factory=list)  # files (host paths or globs) it must not open
    reads: list[str] = field(default_factory=list)  # host files and folders it must not read
    writes: list[str] = field(default_factory=list)  # host folders it must not write in
    ports: list[int] = field(default_factory=list)  # TCP ports on 127.0.0.1 it must not reach
    gate: int = 0  # seconds to wait for the test's SIGUSR1 (and SIGUSR2 after); 0: no gate

    def argv(self) -> list[str]:
        words = ["/probe", "-n", self.nonce]
        # Hex: the probe's own command line (and its shell's) must not hold a secret in the clear.
        words += [word for secret in self.secrets for word in ("-s", secret.encode().hex())]
        words += [word for path in self.canaries for word in ("-f", str(path))]
        words += [word for path in self.reads for word in ("-r", str(path))]
        words += [word for path in self.writes for word in ("-w", str(path))]
        words += [word for port in self.ports for word in ("-p", str(port))]
        if self.gate:
            words += ["-g", str(self.gate)]
        return words


def hostile_context(
    root: Path,
    base: str,
    probe: Path,
    aim: Aim,
    *,
    files: dict[str, str] | None = None,
    build_args: Sequence[str] = (),
) -> Path:
    """A context of its own (unique content first, so no layer is shared with another build) whose
    RUN step is the probe; ``files`` are copied to ``/NAME``; ``build_args`` are declared (ARG)
    before the RUN step, so their values are in its environment."""
    root.mkdir(parents=True)
    (root / "nonce.txt").write_text(f"{aim.nonce} {root}\n")
    (root / "probe").write_bytes(probe.read_bytes())
    (root / "probe").chmod(0o755)
    lines = [f"FROM {base}", "COPY nonce.txt /farm-nonce.txt"]
    for name, text in (files or {}).items():
        (root / name).write_text(text)
        lines.append(f"COPY {name} /{name}")
    lines += [f"ARG {name}" for name in build_args]
    lines += ["COPY probe /probe", "RUN " + shlex.join(aim.argv())]
    (root / "Dockerfile").write_text("\n".join(lines) + "\n")
    return root


def verdicts(output: str) -> dict[str, list[tuple[str, str]]]:
    """Every FARM-PROBE line of a build's output: attack -> [(verdict, detail), ...]."""
    found: dict[str, list[tuple[str, str]]] = {}
    for line in output.splitlines():
        if match := _VERDICT.search(line):
            found.setdefault(match.group(1), []).append((match.group(2), match.group(3)))
    return found


def probe_lines(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if "FARM-PROBE" in line) or "(no FARM-PROBE line)"


def assert_contained(output: str) -> None:
    """The probe ran (one line for each attack, and only those) and every attack was blocked."""
    found = verdicts(output)
    lines = probe_lines(output)
    assert set(found) == ATTACKS, f"the probe did not report every attack exactly:\n{lines}"
    assert all(len(answers) == 1 for answers in found.values()), f"an attack reported twice:\n{lines}"
    escaped = sorted(name for name, [(verdict, _)] in found.items() if verdict != "blocked")
    assert not escaped, f"the build reached what it must not ({', '.join(escaped)}):\n{lines}"


def canary_file(path: Path, secret: str) -> Path:
    """A file only root may read (0600, owned by root: the tests run as root)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"farm-canary {secret}\n")
    path.chmod(0o600)
    return path


def docker_config(home: Path, secret: str) -> Path:
    """``HOME/.docker/config.json`` holding a credential (``secret``) for a registry nobody uses."""
    config = home / ".docker" / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"auths": {"farm-canary.invalid": {"auth": secret}}}))
    config.chmod(0o600)
    return config


_LISTENER = """\
import socket, sys
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)
print(server.getsockname()[1], flush=True)
sys.stdin.read()  # until the test closes this pipe
"""


@contextlib.contextmanager
def canary_process(secret: str, netns: str | None = None) -> Iterator[int]:
    """A process on the host (in ``netns``, if given) with ``secret`` in its environment and on its
    command line, listening on 127.0.0.1; yields its port. Killed afterwards."""
    argv = [sys.executable, "-c", _LISTENER, secret]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    process = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={"PATH": os.environ["PATH"], "FARM_CANARY": secret},
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        if not ready:
            raise lab.LabError("the canary process did not start listening within 30 s")
        yield int(process.stdout.readline())
    finally:
        process.kill()
        process.wait(30)


class Watch:
    """Files that must stay as they are, and folders where the probe must leave no file."""

    def __init__(self, files: Sequence[Path], folders: Sequence[Path]) -> None:
        self.files = {path: self._state(path) for path in files}
        self.folders = list(folders)

    @staticmethod
    def _state(path: Path) -> tuple[bytes, int]:
        return path.read_bytes(), path.stat().st_mtime_ns

    def changed(self) -> list[str]:
        return [str(path) for path, state in self.files.items() if self._state(path) != state]

    def written(self) -> list[str]:
        return sorted(str(path) for folder in self.folders for path in folder.glob(_WRITTEN))

    def clean(self) -> None:
        """Remove what the probe wrote (on a build that was not contained)."""
        for folder in self.folders:
            for path in folder.glob(_WRITTEN):
                path.unlink(missing_ok=True)


def _comm(pid: int) -> str:
    """A process's name: the probe names itself "probe-waiting", then "probe-done"."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _waiting_probe(nonce: str) -> int | None:
    """The probe labelled ``nonce``, in the host's process table, once it waits for the gate (its
    signal handlers set: a signal before that would kill it, or be ignored by a PID namespace's
    pid 1)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0] == b"/probe" and nonce.encode() in argv and _comm(int(entry)) == "probe-waiting":
            return int(entry)
    return None


def gate_probes(nonces: Sequence[str], clients: Sequence[subprocess.Popen[bytes]], seconds: float) -> None:
    """Let gated probes (``Aim.gate``) attack at once: wait until every one of them waits, signal
    them all to attack (SIGUSR1), wait until every one has reported ("probe-done"), then release
    them (SIGUSR2). So every probe attacks while every other one is still running."""
    deadline = time.monotonic() + seconds
    pids: dict[str, int] = {}

    def every_probe_waiting() -> bool:
        for nonce in nonces:
            if nonce not in pids and (pid := _waiting_probe(nonce)) is not None:
                pids[nonce] = pid
        if len(pids) < len(nonces) and (exited := [c.args for c in clients if c.poll() is not None]):
            raise lab.LabError(f"probes waiting: {sorted(pids)} of {list(nonces)}; clients exited: {exited}")
        return len(pids) == len(nonces)

    lab.wait_until(every_probe_waiting, "every probe waiting at its gate", seconds)
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR1)
    lab.wait_until(
        lambda: all(_comm(pid) in ("probe-done", "") for pid in pids.values()),
        "every probe reporting",
        max(1.0, deadline - time.monotonic()),
    )
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR2)
